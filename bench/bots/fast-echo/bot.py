"""The benchmark's upstream: echo every WebSocket message back, and nothing else.

It runs in the real catflap agent runtime (uvicorn + Starlette), like any ``bot.py``. To keep the
upstream as cheap as that stack allows, so that the relay in front of it is what the benchmark
measures, it works on raw ASGI messages: ``ws.receive()`` hands over uvicorn's message dict and
``ws.send()`` passes one back, skipping the ``receive_bytes``/``send_text`` wrappers. Unlike
``examples/echo`` it sends no greeting, so the first frame a client sees is its own echo.
"""


async def bot(args):
    ws = args.websocket
    receive = ws.receive
    send = ws.send
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return  # websocket.disconnect
        text = message.get("text")
        if text is None:
            await send({"type": "websocket.send", "bytes": message["bytes"]})
        else:
            await send({"type": "websocket.send", "text": text})
