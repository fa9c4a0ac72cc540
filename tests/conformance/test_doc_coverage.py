"""Is every promise of docs/PROTOCOL.md tested? This module parses the document:
every sentence with MUST (or MUST NOT), by section, and every error code of the
table in section 4. MUSTS and CODES below say which tests check each; the checks
fail when a MUST or a code of the document has no test, when an entry names a
sentence, code or section the document no longer has, or a test that does not
exist or does not name its section.

Entries ending in `*` are tests other branches of issue 12 provide (SEND retries
and `seq`: the lead's test_s6_send_retry_*; body validation: test_s2_malformed_*;
a full disk: test_s4_storage_full_*). test_owners_tests_are_merged lists those
not yet in the tree; it is expected to fail until they are merged, and to pass
(so its xfail marker must go) once they are.
"""
import ast
import fnmatch
import re
from pathlib import Path


from _core.protocol import ErrorCode, GoawayCode

from .kit import DOC

TESTS = Path(__file__).resolve().parent.parent

#: section -> {a phrase of the MUST sentence: the tests that check it}
MUSTS = {
    "1": {
        "Senders MUST send 0 or 1": [
            "test_s1_booleans_receivers_take_any_nonzero_as_true_senders_send_0_or_1"],
    },
    "2": {
        "A sender MUST set undefined bits to 0, and a receiver MUST ignore bits it does not know": [
            "test_s2_the_server_sets_no_undefined_flag_bits_and_sends_mirror_and_group_fields",
            "test_s2_a_receiver_ignores_flag_bits_it_does_not_know"],
        "so a client MUST implement them": [
            "test_s2_the_server_sets_no_undefined_flag_bits_and_sends_mirror_and_group_fields"],
        "A frame's body MUST match its layout exactly": [
            "test_s2_body_must_match_its_layout_trailing_bytes_are_malformed",
            "test_s2_length_below_two_is_malformed",
            "test_malformed_body_after_welcome"],
    },
    "3": {
        "| version | u16 | MUST be": [
            "test_s3_hello_version_must_be_the_protocol_version"],
        "The body length MUST be exactly `2 + 8 × count`": [
            "test_s3_received_and_read_body_must_match_their_count"],
        "The body length MUST be exactly `1 + len(peer) + 2 + 8 × count`": [
            "test_s3_received_and_read_body_must_match_their_count"],
        "The server MUST answer every PING with a PONG": [
            "test_s3_the_server_answers_every_ping_with_its_nonce"],
        "clients MUST NOT parse it": [
            "test_s3_error_reason_is_for_logs_the_code_is_the_contract"],
        "other bits MUST be 0 and are ignored": [
            "test_s3_privacy_undefined_bits_are_ignored"],
        "the group id, which MUST start with `#`": [
            "test_s3_group_id_must_start_with_hash"],
        # without a cluster: a real gateway whose redirect_for (the hook a cluster node
        # overrides) names another; the cluster's own end-to-end test is tests/test_cluster.py
        "A client MUST connect to that address next": [
            "test_s3_redirect_the_sdk_follows_it_as_the_same_session",
            "test_s3_redirect_the_third_in_a_row_is_not_followed",
            "test_s3_redirect_is_sent_in_place_of_welcome_on_tcp_and_websocket",
            "test_redirect_to_owner"],
    },
    "4": {
        "A client MUST decide whether an error is fatal from the FATAL flag": [
            "test_s4_the_fatal_flag_says_whether_the_connection_ends"],
        "the client MUST send it again, with the same seq, in order": [
            "test_s6_a_refused_seq_holds_the_later_ones_until_it_is_sent_again",
            "test_s6_pipelined_sends_stay_in_order_across_kills_of_the_recipients_worker"],
        "The client MUST NOT send under this producer again": [
            "test_s4_fenced_an_older_producer_of_the_device_may_not_send"],
    },
    "5": {
        "The client MUST send HELLO as its first frame": [
            "test_s5_hello_must_be_the_first_frame",
            "test_s5_a_second_hello_is_unexpected"],
    },
    "6": {
        "Clients MUST treat ids as opaque, ordered integers": [
            "test_s6_ids_are_ordered_u64_integers"],
        "It MUST ignore (not hand to the application) any DELIVER": [
            "test_s6_redelivered_entries_are_ignored_by_the_client"],
        "MUST persist its producer and its outbox together": [
            "test_s6_fresh_producers_start_again_at_seq_1",
            "test_s6_retries_after_a_kill_9_get_their_original_acks"],
        "it MUST carry the same recipient and payload": [
            "test_s6_send_retry_same_seq_is_stored_once"],
        "A client MUST NOT have more than `send_window`": [
            "test_s6_send_window_answers_retries_and_older_ones_without_an_id"],
        "the client MUST send again its whole outbox": [
            "test_s6_sends_made_while_reconnecting_wait_for_the_outbox"],
        "The client MUST then send again, with their seqs and in seq order": [
            "test_s6_a_refused_seq_holds_the_later_ones_until_it_is_sent_again",
            "test_s6_pipelined_sends_stay_in_order_across_kills_of_the_recipients_worker",
            "test_s6_a_gap_is_out_of_order_and_nothing_is_stored_out_of_turn"],
    },
    "7": {
        "a client MUST send only msg_ids of plain DELIVERs it received from `peer`": [
            "test_s7_read_names_the_origin_id_of_a_group_message"],
        "A client MUST NOT depend on receiving every receipt": [
            "test_s7_receipts_are_best_effort"],
    },
    "8": {
        "A client MUST accept PRESENCE for users it did not subscribe to": [
            "test_s8_presence_reaches_every_session_of_the_watcher_send_only_included"],
    },
    "9": {
        "MUST therefore send at least one frame (a PING is enough) per `ping_interval_ms`": [
            "test_s9_a_client_that_sends_every_interval_stays_connected",
            "test_s9_idle_timeout_is_idle_timeout_pings_intervals",
            "test_s9_any_bytes_restart_the_idle_count"],
    },
    "9a": {
        "MUST NOT end inside one": [
            "test_s9a_a_websocket_message_must_not_end_inside_a_frame"],
    },
    "11": {
        "A client written against an earlier revision of this document": [
            "test_s2_the_server_sets_no_undefined_flag_bits_and_sends_mirror_and_group_fields"],
        "Clients MUST handle unknown error codes by the FATAL flag": [
            "test_s4_the_fatal_flag_says_whether_the_connection_ends"],
    },
}

#: error code name (section 4) -> the tests that make the server send it
CODES = {
    "MALFORMED_FRAME": ["test_s2_length_below_two_is_malformed",
                        "test_s2_body_must_match_its_layout_trailing_bytes_are_malformed",
                        "test_s1_ids_hello_with_an_illegal_device_is_malformed"],
    "FRAME_TOO_LARGE": ["test_s2_frame_too_large_is_decided_from_the_prefix"],
    "UNKNOWN_FRAME_TYPE": ["test_s2_unknown_frame_type_is_fatal"],
    "UNEXPECTED_FRAME": ["test_s5_hello_must_be_the_first_frame", "test_s5_a_second_hello_is_unexpected",
                         "test_s3_a_server_only_type_from_a_client_is_unexpected",
                         "test_s3_received_from_a_send_only_session_is_unexpected"],
    "UNSUPPORTED_VERSION": ["test_s3_hello_version_must_be_the_protocol_version",
                            "test_s11_a_server_refuses_every_other_version"],
    "AUTH_FAILED": ["test_s1_ids_hello_whose_token_names_an_illegal_user_is_auth_failed",
                    "test_s5_hello_checks_run_in_the_documented_order",
                    "test_s10_a_token_made_as_documented_is_accepted"],
    "TOKEN_EXPIRED": ["test_s10_an_expired_token_opens_no_session", "test_s10_a_session_ends_when_its_token_expires"],
    "HELLO_TIMEOUT": ["test_s5_hello_timeout_from_accept"],
    "BAD_RECIPIENT": ["test_s1_ids_send_to_an_illegal_recipient_is_bad_recipient_not_fatal"],
    "PAYLOAD_TOO_LARGE": ["test_s4_payload_too_large_fails_only_that_send",
                          "test_s2_a_payload_of_max_payload_fits_every_deliver"],
    "RATE_LIMITED": ["test_s4_rate_limited_sends_are_not_stored_and_may_be_retried",
                     "test_s5_connection_limits_refuse_before_hello"],
    "QUOTA_EXCEEDED": ["test_s4_quota_exceeded_when_no_inbox_has_room"],
    "STORAGE_FULL": ["test_s4_storage_full_*"],
    "UNAVAILABLE": ["test_s4_unavailable_while_the_owners_worker_restarts",
                    "test_s5_connection_limits_refuse_before_hello"],
    "DEVICE_LIMIT": ["test_s5_device_limit_counts_other_registered_devices_online",
                     "test_s5_hello_checks_run_in_the_documented_order"],
    "NOT_A_MEMBER": ["test_s8a_every_refusal_of_a_group_operation"],
    "NOT_ADMIN": ["test_s8a_every_refusal_of_a_group_operation"],
    "GROUP_FULL": ["test_s8a_every_refusal_of_a_group_operation"],
    "NO_SUCH_GROUP": ["test_s8a_every_refusal_of_a_group_operation"],
    "GROUP_EXISTS": ["test_s8a_every_refusal_of_a_group_operation"],
    "BAD_REQUEST": ["test_s8a_every_refusal_of_a_group_operation", "test_s3_group_id_must_start_with_hash",
                    "test_s8a_create_refuses_a_name_that_is_not_1_to_255_bytes",
                    "test_s1_ids_group_ids_and_members_follow_the_rule"],
    "OUT_OF_ORDER": ["test_s6_a_gap_is_out_of_order_and_nothing_is_stored_out_of_turn",
                     "test_s6_a_refused_seq_holds_the_later_ones_until_it_is_sent_again"],
    "FENCED": ["test_s4_fenced_an_older_producer_of_the_device_may_not_send"],
    "INTERNAL": ["test_s4_internal_is_fatal_and_a_retry_after_it_is_served"],
}


# -- reading the document --------------------------------------------------------------------

def sections(text: str) -> dict[str, str]:
    """Section number ("1", "8a", ...) -> its text, subsections included."""
    parts = re.split(r"^## (\d+[a-z]?)\. .*$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def statements(body: str) -> list[str]:
    """The sentences of a section's prose, and each table row as one: code blocks
    and headings left out, whitespace made single."""
    units, para, fenced = [], [], False

    def end_para():
        if para:
            text = " ".join(para)
            units.extend(re.split(r"(?<=[.!?])\s+(?=[A-Z`*(\"])", text))
            para.clear()
    for line in body.splitlines():
        s = line.strip()
        if s.startswith("```"):
            fenced = not fenced
            end_para()
            continue
        if fenced:
            continue
        if not s or s.startswith("#"):
            end_para()
        elif s.startswith("|"):
            end_para()
            units.append(s)
        elif re.match(r"(\* |\d+\. )", s):
            end_para()
            para.append(re.sub(r"^(\* |\d+\. )", "", s))
        else:
            para.append(s)
    end_para()
    return [re.sub(r"\s+", " ", u).strip() for u in units]


def must_sentences() -> dict[str, list[str]]:
    return {sec: [s for s in statements(body) if re.search(r"\bMUST\b", s)]
            for sec, body in sections(DOC.read_text()).items()}


def error_codes() -> dict[str, int]:
    """Section 4's table: code name -> number."""
    body = sections(DOC.read_text())["4"]
    return {m.group(2): int(m.group(1)) for m in re.finditer(r"^\| (\d+) \| ([A-Z_]+) \|", body, re.M)}


def defined_tests() -> dict[str, str]:
    """Every test function under tests/ -> its docstring."""
    found = {}
    for path in TESTS.rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
                found[node.name] = ast.get_docstring(node) or ""
    return found


def _names_section(name: str, doc: str, section: str) -> bool:
    return name.startswith(f"test_s{section}_") or re.search(rf"\b[Ss]ection {section}\b", doc) is not None


# -- the checks ------------------------------------------------------------------------------

def test_every_must_of_the_document_has_a_test():
    """Each MUST sentence is matched by exactly one phrase of its section in MUSTS,
    and every phrase still matches one."""
    doc = must_sentences()
    problems = []
    for sec, sentences in doc.items():
        phrases = MUSTS.get(sec, {})
        for s in sentences:
            hits = [p for p in phrases if p in s]
            if len(hits) != 1:
                problems.append(f"section {sec}: {len(hits)} entries for: {s}")
    for sec, phrases in MUSTS.items():
        if sec not in doc:
            problems.append(f"MUSTS has section {sec}, which the document does not")
            continue
        for p in phrases:
            if not any(p in s for s in doc[sec]):
                problems.append(f"section {sec}: no MUST sentence holds {p!r} any more")
    listing = "\n".join(f"  {sec}: {s}" for sec, ss in doc.items() for s in ss)
    assert not problems, "\n".join(problems) + "\n\nthe document's MUST sentences:\n" + listing


def test_every_error_code_of_section_4_has_a_test():
    """Section 4's table and CODES name the same codes, and the table is the
    server's (`_core.protocol.ErrorCode`)."""
    table = error_codes()
    assert table, "no error code table in section 4"
    assert sorted(table) == sorted(CODES), (sorted(set(table) - set(CODES)), sorted(set(CODES) - set(table)))
    assert table == {c.name: int(c) for c in ErrorCode}, "section 4 and _core/protocol.py list other codes"


def test_the_goaway_codes_of_section_3_are_the_servers():
    """GOAWAY's `code` row lists exactly `_core.protocol.GoawayCode` (a code added on
    one side only, REDIRECT say, fails here)."""
    goaway = sections(DOC.read_text())["3"].split("### GOAWAY")[1]
    row = re.search(r"^\| 0 \| code \| u16 \| (.*) \|$", goaway, re.M)
    assert row, "no code row in section 3's GOAWAY table"
    listed = {m.group(2): int(m.group(1)) for m in re.finditer(r"(\d+) ([A-Z_]+)", row.group(1))}
    assert listed == {c.name: int(c) for c in GoawayCode}, "section 3's GOAWAY codes and _core/protocol.py differ"


def test_the_named_tests_exist_and_name_their_section():
    tests = defined_tests()
    problems = []
    for sec, phrases in MUSTS.items():
        for phrase, names in phrases.items():
            if not [n for n in names if not n.endswith("*")]:
                continue                      # only tests of other branches (checked below)
            for name in names:
                if name.endswith("*"):
                    continue
                if name not in tests:
                    problems.append(f"section {sec}: no test {name}")
                elif not _names_section(name, tests[name], sec):
                    problems.append(f"section {sec}: {name} does not name section {sec}")
    for code, names in CODES.items():
        for name in names:
            if name.endswith("*"):
                continue
            if name not in tests:
                problems.append(f"{code}: no test {name}")
            elif not re.match(r"test_s\d+[a-z]?_", name) or (code not in tests[name]
                                                              and code.lower() not in name):
                problems.append(f"{code}: {name} does not name its section, or the code")
    assert not problems, "\n".join(problems)


def test_conformance_tests_name_sections_the_document_has():
    """A test_sN_... whose section N the document does not have is left over."""
    secs = set(sections(DOC.read_text()))
    here = Path(__file__).resolve().parent
    stale = []
    for path in here.glob("test_*.py"):
        for m in re.finditer(r"^def (test_s(\d+[a-z]?)_\w+)", path.read_text(), re.M):
            if m.group(2) not in secs:
                stale.append(m.group(1))
    assert not stale, stale


def test_owners_tests_are_merged():
    tests = defined_tests()
    globs = {n for phrases in MUSTS.values() for names in phrases.values() for n in names if n.endswith("*")}
    globs |= {n for names in CODES.values() for n in names if n.endswith("*")}
    missing = sorted(g for g in globs if not fnmatch.filter(tests, g))
    assert not missing, f"no test matches {missing}"
