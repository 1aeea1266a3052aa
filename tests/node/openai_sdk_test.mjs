// node openai_sdk_test.mjs TLS_PORT KEY: the official SDK's OpenAIRealtimeWS, with only
// baseURL and apiKey changed, through the sidecar's loopback TLS listener
// (NODE_EXTRA_CA_CERTS points at the sidecar's CA).
import OpenAI from 'openai';
import { OpenAIRealtimeWS } from 'openai/realtime/ws';

const [port, key] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `https://127.0.0.1:${port}/v1`, apiKey: key });
const rt = new OpenAIRealtimeWS({ model: 'mock-realtime' }, client);
const seen = [];
let closeCode = null;
const done = (why) => {
  console.log(JSON.stringify({ why, seen, closeCode }));
  process.exit(0);
};
rt.on('event', (event) => seen.push(event.type));
rt.on('error', (err) => seen.push(`error: ${err.message}`));
rt.on('session.created', () => {
  rt.send({ type: 'input_audio_buffer.append', audio: Buffer.alloc(4800).toString('base64') });
  rt.send({ type: 'input_audio_buffer.commit' });
});
rt.on('response.done', () => rt.close());
rt.socket.on('close', (code) => { closeCode = code; done('closed'); });
setTimeout(() => done('timeout'), 15000);
