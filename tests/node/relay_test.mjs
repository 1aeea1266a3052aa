// node relay_test.mjs BASE_URL KEY: frames of every header size class, text and
// binary, fragmented messages and ping/pong through the sidecar to the mock provider.
import { randomBytes } from 'node:crypto';
import { ConduitRealTimeAudio } from './conduit_client.mjs';

const [baseUrl, key] = process.argv.slice(2);
const sizes = [0, 125, 126, 65536, 16 * 1024 * 1024];
const expected = [];
const received = [];
let sessionCreated = false;

function finish(ok, why) {
  console.log(JSON.stringify({ ok, why, sessionCreated, count: received.length }));
  process.exit(ok ? 0 : 1);
}

const client = new ConduitRealTimeAudio(key, 'mock-realtime', 'mock', baseUrl);
client.onTextMessage = (text) => {
  if (!sessionCreated && JSON.parse(text).type === 'session.created') { sessionCreated = true; return; }
  received.push(['text', Buffer.from(text)]);
  check();
};
client.onAudioData = (buf) => { received.push(['binary', Buffer.from(buf)]); check(); };
client.onError = (e) => finish(false, String(e));
client.onClose = (code) => { if (received.length < expected.length) finish(false, `closed ${code}`); };
client.onOpen = () => {
  for (const size of sizes) {
    const bin = randomBytes(size);
    const text = Buffer.from('a'.repeat(size));
    expected.push(['binary', bin], ['text', text]);
    client.sendAudio(bin);
    client.send(text.toString());
  }
  // A fragmented binary message and a fragmented text message.
  const parts = [randomBytes(10), randomBytes(0), randomBytes(70000)];
  expected.push(['binary', Buffer.concat(parts)]);
  parts.forEach((p, i) => client.send(p, { binary: true, fin: i === parts.length - 1 }));
  const tparts = ['héllo ', 'wörld'];
  expected.push(['text', Buffer.from(tparts.join(''))]);
  tparts.forEach((p, i) => client.send(p, { binary: false, fin: i === tparts.length - 1 }));
  client.ws.ping(Buffer.from('ping-payload'));
};
let pong = false;
function check() {
  if (received.length < expected.length || !pong) return;
  for (let i = 0; i < expected.length; i++) {
    const [kind, data] = expected[i];
    if (received[i][0] !== kind || !received[i][1].equals(data)) finish(false, `message ${i} differs`);
  }
  // disconnect() sends a close without a code; the provider's reply carries none either,
  // and the sidecar answers it as a normal closure (1000).
  client.ws.on('close', (code) => finish(code === 1000, `close ${code}`));
  client.disconnect();
}
client.connect();
client.ws.on('pong', (data) => { pong = data.toString() === 'ping-payload'; check(); });
setTimeout(() => finish(false, 'timeout'), 30000);
