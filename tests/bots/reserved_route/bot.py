"""A bot that declares a route on a path the runtime serves itself: the start must fail."""

from pipecatcloud_system import app


@app.get("/metrics")
async def metrics():
    return {"mine": True}


async def bot(args):
    pass
