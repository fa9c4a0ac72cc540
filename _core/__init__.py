"""Switchboard's C-speed core: framing codec and routing hot path (Cython).

`_core.codec` is the codec the rest of the code uses: the Cython one, or the
pure-Python reference when SWITCHBOARD_CODEC=python.
"""
