"""Recording: what a delivery does to the tables. The merge rules, each event's effects as
rows, and the one statement that records a delivery and applies it (live, spooled, replayed)."""
