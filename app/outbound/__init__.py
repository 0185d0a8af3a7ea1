"""Telling the agency's own systems: outbound messages to the destinations declared in
DESTINATIONS_FILE, derived events, and how the sending is seen."""
