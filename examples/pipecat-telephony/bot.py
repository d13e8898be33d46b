"""A real Pipecat telephony bot: Twilio, Telnyx, Plivo or Exotel, echoing the caller's audio.

It is written the way Pipecat Cloud's telephony examples are: ``parse_telephony_websocket``
reads the provider's opening messages (which catflap's ``/ws/<provider>`` endpoints replay to
the bot byte for byte), picks the provider, and the provider's own serializer is put on a
``FastAPIWebsocketTransport``. The pipeline is ``input -> EchoProcessor -> output`` at 8 kHz,
so the caller hears themselves.

Environment:

- ``TWILIO_ACCOUNT_SID``/``TWILIO_AUTH_TOKEN``, ``TELNYX_API_KEY``,
  ``PLIVO_AUTH_ID``/``PLIVO_AUTH_TOKEN``: the credentials the serializers use to hang up the
  call when the pipeline ends (Exotel needs none).
- ``HANG_UP_ON_END=0`` turns that hang-up off (offline tests must not call the providers' APIs).

With ``?body={"report": true}`` (base64 JSON) the bot first sends one JSON message describing
what it detected, ``{"event": "catflap-report", "transport_type", "call_data", "body"}``;
catflap's tests use it, and it is a handy check when wiring a new number.
"""

import os

from loguru import logger
from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    OutputAudioRawFrame,
    OutputTransportMessageUrgentFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.runner.types import RunnerArguments
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.exotel import ExotelFrameSerializer
from pipecat.serializers.plivo import PlivoFrameSerializer
from pipecat.serializers.telnyx import TelnyxFrameSerializer
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
from pipecat.workers.runner import WorkerRunner

SAMPLE_RATE = 8000  # telephony audio; no resampling anywhere in the echo path


class EchoProcessor(FrameProcessor):
    """Sends every inbound audio frame straight back out."""

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            await self.push_frame(
                OutputAudioRawFrame(
                    audio=frame.audio,
                    sample_rate=frame.sample_rate,
                    num_channels=frame.num_channels,
                )
            )
        else:
            await self.push_frame(frame, direction)


def make_serializer(provider: str, call_data):
    """The provider's own Pipecat serializer, as ``create_transport`` builds it."""
    hang_up = os.getenv("HANG_UP_ON_END", "1") != "0"
    if provider == "twilio":
        return TwilioFrameSerializer(
            stream_sid=call_data["stream_id"],
            call_sid=call_data["call_id"],
            account_sid=os.getenv("TWILIO_ACCOUNT_SID", ""),
            auth_token=os.getenv("TWILIO_AUTH_TOKEN", ""),
            params=TwilioFrameSerializer.InputParams(auto_hang_up=hang_up),
        )
    if provider == "telnyx":
        return TelnyxFrameSerializer(
            stream_id=call_data["stream_id"],
            call_control_id=call_data["call_id"],
            outbound_encoding=call_data["outbound_encoding"],
            inbound_encoding="PCMU",
            api_key=os.getenv("TELNYX_API_KEY", ""),
            params=TelnyxFrameSerializer.InputParams(auto_hang_up=hang_up),
        )
    if provider == "plivo":
        return PlivoFrameSerializer(
            stream_id=call_data["stream_id"],
            call_id=call_data["call_id"],
            auth_id=os.getenv("PLIVO_AUTH_ID", ""),
            auth_token=os.getenv("PLIVO_AUTH_TOKEN", ""),
            params=PlivoFrameSerializer.InputParams(auto_hang_up=hang_up),
        )
    if provider == "exotel":
        return ExotelFrameSerializer(
            stream_sid=call_data["stream_id"], call_sid=call_data["call_id"]
        )
    raise ValueError(f"not a telephony stream (detected {provider!r})")


async def bot(runner_args: RunnerArguments):
    provider, call_data = await parse_telephony_websocket(runner_args.websocket)
    runner_args.transport_type, runner_args.call_data = provider, call_data
    logger.info(f"{provider} call {call_data.call_id} on stream {call_data.stream_id}")
    transport = FastAPIWebsocketTransport(
        websocket=runner_args.websocket,
        params=FastAPIWebsocketParams(
            audio_in_enabled=True,
            audio_out_enabled=True,
            add_wav_header=False,
            serializer=make_serializer(provider, call_data),
        ),
    )
    worker = PipelineWorker(
        Pipeline([transport.input(), EchoProcessor(), transport.output()]),
        params=PipelineParams(audio_in_sample_rate=SAMPLE_RATE, audio_out_sample_rate=SAMPLE_RATE),
        enable_rtvi=False,
        idle_timeout_secs=runner_args.pipeline_idle_timeout_secs,
    )

    @transport.event_handler("on_client_connected")
    async def on_client_connected(transport, websocket):
        body = runner_args.body if isinstance(runner_args.body, dict) else {}
        if body.get("report"):
            report = {
                "event": "catflap-report",
                "transport_type": provider,
                "call_data": call_data.model_dump(by_alias=True),
                "body": runner_args.body,
            }
            await worker.queue_frame(OutputTransportMessageUrgentFrame(message=report))

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, websocket):
        await worker.cancel()  # the caller hung up: end bot() now

    runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)
    await runner.add_workers(worker)
    await runner.run()


if __name__ == "__main__":
    from pipecat.runner.run import main

    main()
