"""The ledger: tables and the operations on them. The only SQL in Lethe lives here."""
