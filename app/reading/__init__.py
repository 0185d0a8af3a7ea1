"""Reading: what ops see. The read API and its wire formats, renewals, exports, the
dashboard with its templates, and /docs; nothing here writes what a delivery wrote."""
