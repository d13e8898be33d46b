"""The memory benchmark's bot: ``examples/pipecat-echo`` with a Silero VAD, as every voice bot has.

Issue 15 measures instance memory with "pipecat-echo plus ``SileroVADAnalyzer()`` in its
transport params". Pipecat >= 1.0 has no ``vad_analyzer`` transport parameter any more (and its
pydantic model silently drops unknown fields), so the analyzer goes where Pipecat 1.x puts it: a
``VADProcessor`` right after ``transport.input()``. Every inbound audio frame then runs through
Silero's ONNX model (onnxruntime, one thread), which is what a live voice session costs.

Each session builds its own ``SileroVADAnalyzer()``, as a bot does: one ONNX inference session
per instance, created in ``bot()``, never shared between sessions.

The echo is pipecat-echo's: audio comes back as audio (16 kHz mono), messages as messages.
"""

from pipecat.audio.vad.silero import SileroVADAnalyzer
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
from pipecat.processors.audio.vad_processor import VADProcessor
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
    vad = VADProcessor(vad_analyzer=SileroVADAnalyzer())
    worker = PipelineWorker(
        Pipeline([transport.input(), vad, EchoProcessor(), transport.output()]),
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
