"""Outbound: telling the agency's systems (CONTRACT section 9). `messages` writes messages in
the caller's transaction and sits below recording; the rest (dispatch, formats) sits above."""
