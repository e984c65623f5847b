"""Job kinds for runner: built-ins, backfill, consensus. Registered through entry points."""
