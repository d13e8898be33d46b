"""A real Pipecat pipeline that echoes what a Pipecat WebSocket client sends.

The pipeline is ``transport.input() -> EchoProcessor -> transport.output()`` on pipecat's
``FastAPIWebsocketTransport``, built with ``create_transport`` exactly as PCC's examples build it.

Wire format: ``ProtobufFrameSerializer``, the binary protobuf ``Frame`` that pipecat's own
WebSocket clients speak (``@pipecat-ai/websocket-transport``; ``pipecat/frames/frames.proto``).
What comes back:

- an ``audio`` frame (16 kHz, mono, 16-bit PCM) comes back as audio, paced in real time and cut
  into 40 ms chunks, so 1280-byte chunks return byte for byte;
- a ``message`` frame (JSON) comes back as the same message;
- a ``text`` frame comes back as the message ``{"echo": TEXT}`` (the serializer writes no text
  frames from the bot's side).

RTVI is switched off so that nothing but the echo reaches the client. Hanging up cancels the
pipeline, so ``bot()`` returns at once.

Pipecat >= 1.3 names the classes ``PipelineWorker`` and ``WorkerRunner``; ``PipelineTask`` and
``PipelineRunner`` are their deprecated aliases.
"""

from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    InputTransportMessageFrame,
    OutputAudioRawFrame,
    OutputTransportMessageUrgentFrame,
    TextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.runner.types import RunnerArguments
from pipecat.runner.utils import create_transport
from pipecat.serializers.protobuf import ProtobufFrameSerializer
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams
from pipecat.workers.runner import WorkerRunner

SAMPLE_RATE = 16000


class EchoProcessor(FrameProcessor):
    """Turns each inbound audio, message or text frame into the matching outbound frame."""

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            echo = OutputAudioRawFrame(
                audio=frame.audio, sample_rate=frame.sample_rate, num_channels=frame.num_channels
            )
            await self.push_frame(echo)
        elif isinstance(frame, InputTransportMessageFrame):
            await self.push_frame(OutputTransportMessageUrgentFrame(message=frame.message))
        elif isinstance(frame, TextFrame):
            await self.push_frame(OutputTransportMessageUrgentFrame(message={"echo": frame.text}))
        else:
            await self.push_frame(frame, direction)


async def bot(runner_args: RunnerArguments):
    transport = await create_transport(
        runner_args,
        {
            "websocket": lambda: FastAPIWebsocketParams(
                audio_in_enabled=True,
                audio_out_enabled=True,
                serializer=ProtobufFrameSerializer(),
            ),
        },
    )
    worker = PipelineWorker(
        Pipeline([transport.input(), EchoProcessor(), transport.output()]),
        params=PipelineParams(audio_in_sample_rate=SAMPLE_RATE, audio_out_sample_rate=SAMPLE_RATE),
        enable_rtvi=False,
        idle_timeout_secs=runner_args.pipeline_idle_timeout_secs,
    )

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, websocket):
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)
    await runner.add_workers(worker)
    await runner.run()


if __name__ == "__main__":
    from pipecat.runner.run import main

    main()
