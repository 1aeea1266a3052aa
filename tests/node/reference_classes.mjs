// node reference_classes.mjs REFERENCE_MD BASE_URL GOOD_KEY DOWN_PROVIDER [PROVIDER]
//
// (With PROVIDER, only ResilientRealTimeAudio's policy against that provider runs.)
//
// The Conduit docs page's client classes, run as printed: every `class ...` of its
// javascript blocks, unchanged except for the docs' placeholder origin, which becomes
// the sidecar's. They were written for the npm `ws` package before 8.0 (text arrives as
// a string, binary as a Buffer: `data instanceof Buffer` tells them apart), so `ws` 7
// is their `WebSocket`. Prints one JSON object of what each scenario saw.
import { readFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import WebSocket from 'ws7';

const [referenceMd, baseUrl, goodKey, downProvider, onlyProvider] = process.argv.slice(2);
const PLACEHOLDER = 'wss://api.conduit.yourdomain.com';

const page = readFileSync(referenceMd, 'utf8');
const blocks = [...page.matchAll(/```javascript\n([\s\S]*?)```/g)].map((m) => m[1]);
const classes = blocks.flatMap((b) => [...b.matchAll(/^class \w+[^\n]*\{\n[\s\S]*?^\}$/gm)].map((m) => m[0]));
let source = classes.join('\n\n');
const placeholders = source.split(PLACEHOLDER).length - 1;
source = source.replace(PLACEHOLDER, baseUrl);

const logs = [];
const record = (...args) => logs.push(args.map(String).join(' '));
const names = classes.map((c) => c.match(/^class (\w+)/)[1]);
const loaded = new Function('WebSocket', 'console', `${source}\nreturn { ${names.join(', ')} };`)(
  WebSocket, { log: record, error: record, warn: record });

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
async function until(check, ms = 5000) {
  for (let waited = 0; waited < ms; waited += 10) {
    if (check()) return true;
    await sleep(10);
  }
  return false;
}

// The docs' usage example: handlers assigned on the instance, then connect, then send.
async function basic() {
  const client = new loaded.ConduitRealTimeAudio(goodKey, 'mock-realtime', 'mock');
  const texts = [];
  const audio = [];
  client.onTextMessage = (message) => texts.push(message);
  client.onAudioData = (buffer) => audio.push(buffer);
  client.connect();
  const opened = await until(() => client.isConnected);
  const sent = randomBytes(960);
  client.sendText({ type: 'configure', config: {} });
  client.sendText({ type: 'session.update', session: { voice: 'alloy' } });
  client.sendAudio(sent);
  await until(() => texts.length >= 3 && audio.length >= 1);
  const ws = client.ws;
  const closed = new Promise((resolve) => ws.on('close', (code) => resolve(code)));
  client.disconnect();
  return {
    opened,
    types: texts.map((m) => m.type),
    echoed: texts.some((m) => m.type === 'configure'),
    audioEqual: audio.length === 1 && audio[0].equals(sent),
    closeCode: await closed,
  };
}

// ResilientRealTimeAudio's policy against the sidecar's close codes; `connects`
// counts the reconnections its own timer makes.
class Counted extends loaded.ResilientRealTimeAudio {
  connect() {
    this.connects = (this.connects || 0) + 1;
    super.connect();
  }
}

async function resilient(key, provider) {
  const client = new Counted(key, 'mock-realtime', provider, { maxReconnectAttempts: 2, reconnectDelay: 50 });
  const start = logs.length;
  client.connect();
  // The first close, then a second more: far past reconnectDelay, so every reconnect
  // the policy makes has been made.
  await until(() => logs.slice(start).some((l) => l.startsWith('Connection closed')), 10000);
  await sleep(1000);
  if (client.ws) client.ws.terminate();
  return { connects: client.connects, logs: logs.slice(start).filter((l) => l.startsWith('Connection closed') || l.startsWith('Max')) };
}

// The docs' policy does not reconnect after an intentional close: disconnect() closes
// without a code, and the answer to that close must say so (1000), not 1005, on which
// the policy reconnects and undoes the disconnect.
async function disconnected() {
  const client = new Counted(goodKey, 'mock-realtime', 'mock', { maxReconnectAttempts: 2, reconnectDelay: 50 });
  const start = logs.length;
  client.onTextMessage = () => {};
  client.connect();
  await until(() => client.isConnected);
  const ws = client.ws;
  client.disconnect();
  await until(() => ws.readyState === WebSocket.CLOSED);
  await sleep(500);  // far past reconnectDelay: a reconnect the policy makes has been made
  if (client.ws) client.ws.terminate();
  return { connects: client.connects, logs: logs.slice(start).filter((l) => l.startsWith('Connection closed')) };
}

async function validated() {
  const client = new loaded.ValidatedRealTimeAudio(goodKey, 'mock-realtime', 'mock');
  const texts = [];
  client.onTextMessage = (message) => texts.push(message);
  client.connect();
  await until(() => client.isConnected);
  client.sendText({ no: 'type' });
  client.sendText({ type: 'session.update', session: {} });
  await until(() => texts.length >= 2);
  await sleep(200);
  client.disconnect();
  return { types: texts.map((m) => m.type), refused: logs.some((l) => l.startsWith('Invalid message format')) };
}

async function monitored() {
  const client = new loaded.MonitoredRealTimeAudio(goodKey, 'mock-realtime', 'mock');
  const audio = [];
  client.onAudioData = (buffer) => audio.push(buffer);
  client.onTextMessage = () => {};
  client.connect();
  await until(() => client.isConnected);
  client.sendAudio(randomBytes(960));
  client.sendAudio(randomBytes(480));
  await until(() => audio.length >= 2);
  const stats = client.getStats();
  client.disconnect();
  return stats;
}

if (onlyProvider) {
  console.log(JSON.stringify(await resilient(goodKey, onlyProvider)));
  process.exit(0);
}
const result = { placeholders, classes: names };
result.basic = await basic();
result.badKey = await resilient('condt_unknown', 'mock');
result.providerDown = await resilient(goodKey, downProvider);
result.disconnected = await disconnected();
result.validated = await validated();
result.monitored = await monitored();
console.log(JSON.stringify(result));
process.exit(0);
