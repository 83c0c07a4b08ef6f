"""An example storefront backend (FastAPI + SQLite) that the assistant's tools call on a dev box."""
