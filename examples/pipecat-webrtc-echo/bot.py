"""A real Pipecat bot that echoes the caller's audio back over SmallWebRTC.

Start it with ``/start`` and ``"transport": "webrtc"``; the client (Pipecat's JS client with
``@pipecat-ai/small-webrtc-transport``, or any WebRTC peer) then posts its offer to
``/v1/public/{agent}/sessions/{sessionId}/api/offer``. The bot receives
``SmallWebRTCSessionArguments`` and builds its transport with ``create_transport`` exactly as
PCC's examples do.

The pipeline is ``transport.input() -> EchoProcessor -> transport.output()``: every inbound
audio frame (16 kHz mono PCM after pipecat's resampler) goes out again as the bot's audio
track, so a caller hears itself. RTVI stays on (pipecat's default): the client's
``client-ready`` is answered with ``bot-ready``, which is what takes a Pipecat client to its
``ready`` state. A text message over the data channel is echoed as the server message
``{"echo": ...}``. The client hanging up cancels the pipeline, so ``bot()`` returns at once.
"""

from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    InputTransportMessageFrame,
    OutputAudioRawFrame,
    OutputTransportMessageUrgentFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.runner.types import RunnerArguments
from pipecat.runner.utils import create_transport
from pipecat.transports.base_transport import TransportParams
from pipecat.workers.runner import WorkerRunner

SAMPLE_RATE = 16000


class EchoProcessor(FrameProcessor):
    """Turns each inbound audio frame into an outbound one, and echoes transport messages."""

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            echo = OutputAudioRawFrame(
                audio=frame.audio, sample_rate=frame.sample_rate, num_channels=frame.num_channels
            )
            await self.push_frame(echo)
        elif isinstance(frame, InputTransportMessageFrame):
            echoed = OutputTransportMessageUrgentFrame(message={"echo": frame.message})
            await self.push_frame(echoed)
        else:
            await self.push_frame(frame, direction)


async def bot(runner_args: RunnerArguments):
    transport = await create_transport(
        runner_args,
        {"webrtc": lambda: TransportParams(audio_in_enabled=True, audio_out_enabled=True)},
    )
    worker = PipelineWorker(
        Pipeline([transport.input(), EchoProcessor(), transport.output()]),
        params=PipelineParams(audio_in_sample_rate=SAMPLE_RATE, audio_out_sample_rate=SAMPLE_RATE),
        idle_timeout_secs=runner_args.pipeline_idle_timeout_secs,
    )

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, client):
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)
    await runner.add_workers(worker)
    await runner.run()


if __name__ == "__main__":
    from pipecat.runner.run import main

    main()
