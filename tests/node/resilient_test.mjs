// node resilient_test.mjs BASE_URL KEY: the docs' reconnect policy must not
// reconnect after the sidecar's 4001.
import { ResilientRealTimeAudio } from './conduit_client.mjs';

const [baseUrl, key] = process.argv.slice(2);
const client = new ResilientRealTimeAudio(key, 'mock-realtime', 'mock', baseUrl, { reconnectDelay: 100 });
client.connect();
setTimeout(() => {
  console.log(JSON.stringify({ connects: client.connects, closes: client.closes }));
  process.exit(0);
}, 1500);
