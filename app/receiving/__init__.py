"""Receiving: POST /webhooks/cmr from the wire to a durable delivery. The route, the guards
on the wire, signatures, the sender's payload models, and commit-or-spool with its spool."""
