"""The control API: FastAPI routers served on the gateway's port, built from one ``ApiDeps``."""
