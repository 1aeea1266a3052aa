// @deepgram/sdk (Node) voice agent through the sidecar: baseUrl at the sidecar (it
// stands for every environment, the agent's host too), the virtual key as apiKey.
// Settings as soon as the socket opens (the README's flow), then one InjectUserMessage
// once SettingsApplied, and a close after AgentAudioDone.
// Usage: node deepgram_agent_test.mjs BASE_URL KEY THINK_MODEL  -> JSON on stdout
import { DeepgramClient } from '@deepgram/sdk';

const [baseUrl, apiKey, thinkModel] = process.argv.slice(2);
const client = new DeepgramClient({ apiKey, baseUrl });
const result = { types: [], said: [], audioBytes: 0, close: null };
const socket = await client.agent.v1.connect({ reconnectAttempts: 0 });
const closed = new Promise((resolve) => {
  socket.on('message', (m) => {
    if (m instanceof Blob) { // agent audio, as a Blob
      result.audioBytes += m.size;
      return;
    }
    result.types.push(m.type);
    if (m.type === 'ConversationText') result.said.push(m.content);
    if (m.type === 'SettingsApplied') socket.sendInjectUserMessage({ type: 'InjectUserMessage', content: 'hello node' });
    if (m.type === 'AgentAudioDone') socket.close();
  });
  socket.on('close', (e) => { result.close ??= [e.code, e.reason]; resolve(); });
  socket.on('error', (e) => { result.error = String(e.message ?? e); });
});
socket.connect();
try {
  await socket.waitForOpen();
  socket.sendSettings({
    type: 'Settings',
    audio: { input: { encoding: 'linear16', sample_rate: 24000 },
             output: { encoding: 'linear16', sample_rate: 16000, container: 'none' } },
    agent: {
      listen: { provider: { type: 'deepgram', version: 'v1', model: 'nova-3' } },
      think: { provider: { type: 'open_ai', model: thinkModel } },
      speak: { provider: { type: 'deepgram', model: 'aura-2-thalia-en' } },
    },
  });
} catch (e) {
  result.error = String(e.message ?? e);
}
const timer = setTimeout(() => { result.error = 'timeout'; process.stdout.write(JSON.stringify(result)); process.exit(1); }, 20000);
await closed;
clearTimeout(timer);
process.stdout.write(JSON.stringify(result));
process.exit(0);
