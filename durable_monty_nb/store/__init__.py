"""The store: SQLAlchemy tables, transactions, leases, signatures and schema versions."""
