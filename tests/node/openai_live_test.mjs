// node openai_live_test.mjs PORT KEY MODEL: the official SDK's LiveWS (client.live),
// with only baseURL and apiKey changed, through the sidecar: session.start, a second of
// audio, session.close. Prints what it saw and the close code.
import OpenAI from 'openai';
import { LiveWS } from 'openai/resources/live/ws';

const [port, key, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: key });
const live = new LiveWS(client, { reconnect: false });
const seen = [];
let started = null;
let seconds = null;
const done = (why, closeCode = null, closeReason = null) => {
  console.log(JSON.stringify({ why, seen, started, seconds, closeCode, closeReason }));
  process.exit(0);
};
live.on('event', (event) => seen.push(event.type));
live.on('error', () => {});  // the close says why
live.on('session.started', (event) => {
  started = event.session.model;
  live.send({ type: 'session.input_audio.append', audio: Buffer.alloc(48000).toString('base64') });
  live.send({ type: 'session.close' });
});
live.on('session.closed', (event) => { seconds = event.usage.seconds; });
live.on('close', (code, reason) => done('closed', code, String(reason ?? '')));
live.send({ type: 'session.start', session: { model } });
setTimeout(() => done('timeout'), 15000);
