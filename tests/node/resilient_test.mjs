// node resilient_test.mjs BASE_URL KEY: the docs' reconnect policy must not
// reconnect after the sidecar's 4001.
import { ResilientRealTimeAudio } from './conduit_client.mjs';

const [baseUrl, key] = process.argv.slice(2);
const client = new ResilientRealTimeAudio(key, 'mock-realtime', 'mock', baseUrl, { reconnectDelay: 100 });
client.connect();
// A second after the first close (far past reconnectDelay), every reconnect the policy
// makes has been made; no close within 10 s fails.
const started = Date.now();
let firstClose = null;
const timer = setInterval(() => {
  if (firstClose === null && client.closes.length) firstClose = Date.now();
  if (firstClose !== null && Date.now() - firstClose >= 1000) {
    console.log(JSON.stringify({ connects: client.connects, closes: client.closes }));
    process.exit(0);
  }
  if (Date.now() - started > 10000) {
    clearInterval(timer);
    console.log(JSON.stringify({ error: 'no close within 10 s' }));
    process.exit(1);
  }
}, 20);
