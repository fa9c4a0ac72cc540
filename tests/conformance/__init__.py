"""Conformance: docs/PROTOCOL.md walked section by section against real gateways.

Every MUST of the document and every error code of its section 4 has a test
whose name says its section (`test_s5_...` for section 5); test_doc_coverage.py
parses the document and fails when one has none.
"""
