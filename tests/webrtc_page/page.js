// The browser test's page: Pipecat's published JS client with its SmallWebRTC transport,
// pointed at catflap's /start. tests/test_webrtc.py bundles it with esbuild at test time.
import { PipecatClient } from "@pipecat-ai/client-js";
import { SmallWebRTCTransport } from "@pipecat-ai/small-webrtc-transport";

// The transport's default media manager (DailyMediaManager) loads Daily's call-machine bundle
// from Daily's CDN, which this test never reaches; this one takes the microphone with
// getUserMedia (Chromium's fake device) and gives the transport its track, nothing more.
class LocalMediaManager {
  constructor() {
    this.micTrack = null;
    this.isMicEnabled = true;
    this.isCamEnabled = false;
    this.isSharingScreen = false;
    this.supportsScreenShare = false;
    this.selectedMic = {};
    this.selectedCam = {};
    this.selectedSpeaker = {};
  }
  setClientOptions(options) { this.isMicEnabled = options.enableMic ?? true; }
  async initialize() {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    this.micTrack = stream.getAudioTracks()[0];
  }
  async connect() {}
  async disconnect() { if (this.micTrack) this.micTrack.stop(); }
  tracks() { return { local: { audio: this.micTrack, video: null, screenVideo: null } }; }
  enableMic(enable) { this.isMicEnabled = enable; if (this.micTrack) this.micTrack.enabled = enable; }
  enableCam() {}
  async getAllMics() { return []; }
  async getAllCams() { return []; }
  async getAllSpeakers() { return []; }
  updateMic() {}
  updateCam() {}
  updateSpeaker() {}
}

const state = { states: [], ready: false, botAudio: false, peakRms: 0, error: null };
window.catflapState = state;

function show() {
  document.getElementById("state").textContent = JSON.stringify(state, null, 2);
}

function measure(track) {
  // Chrome feeds a remote track to Web Audio only while a media element plays it.
  const stream = new MediaStream([track]);
  const audio = new Audio();
  audio.srcObject = stream;
  audio.play().catch(() => {});
  const context = new AudioContext();
  const analyser = context.createAnalyser();
  analyser.fftSize = 2048;
  context.createMediaStreamSource(stream).connect(analyser);
  const samples = new Float32Array(analyser.fftSize);
  setInterval(() => {
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const v of samples) sum += v * v;
    state.peakRms = Math.max(state.peakRms, Math.sqrt(sum / samples.length));
    show();
  }, 50);
}

window.catflapStart = async (agent, key) => {
  const client = new PipecatClient({
    transport: new SmallWebRTCTransport({ mediaManager: new LocalMediaManager() }),
    enableMic: true,
    enableCam: false,
    callbacks: {
      onTransportStateChanged: (s) => { state.states.push(s); show(); },
      onBotReady: () => { state.ready = true; show(); },
      onTrackStarted: (track, participant) => {
        if (track.kind === "audio" && !(participant && participant.local)) {
          state.botAudio = true;
          measure(track);
        }
      },
    },
  });
  window.catflapClient = client;
  try {
    await client.startBotAndConnect({
      endpoint: `/v1/public/${agent}/start`,
      headers: new Headers({ Authorization: `Bearer ${key}` }),
      requestData: { transport: "webrtc", body: { from: "browser" } },
    });
  } catch (e) {
    state.error = String(e);
  }
  show();
};
