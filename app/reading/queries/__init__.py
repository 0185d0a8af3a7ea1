"""What the read side reads, as query functions that the API's routes and the dashboard's
pages both call: one module per thing read (its query model, its SQL, its paging)."""
