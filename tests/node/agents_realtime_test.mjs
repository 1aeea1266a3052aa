// node agents_realtime_test.mjs BASE KEY: @openai/agents-realtime's RealtimeSession over
// its websocket transport, `url` at the sidecar and the virtual key as apiKey; one user
// text message, its turn to agent_end. Prints the provider's event types as JSON.
import { RealtimeAgent, RealtimeSession } from '@openai/agents-realtime';

const [base, key] = process.argv.slice(2);
const agent = new RealtimeAgent({ name: 'Assistant', instructions: 'Answer briefly.' });
const session = new RealtimeSession(agent, { transport: 'websocket', model: 'mock-realtime' });
const seen = [];
const done = (end, extra = {}) => {
  console.log(JSON.stringify({ end, seen, ...extra }));
  process.exit(0);
};
session.on('transport_event', (event) => seen.push(`server:${event.type}`));
session.on('agent_start', () => seen.push('agent_start'));
session.on('agent_end', () => { seen.push('agent_end'); done('agent_end'); });
session.on('error', (e) => seen.push(`error: ${e.error?.message ?? JSON.stringify(e.error)}`));
setTimeout(() => done('timeout'), 15000);
try {
  await session.connect({ apiKey: key, url: `${base}/v1/realtime?model=mock-realtime` });
  session.transport.on('disconnected', () => done('closed'));
  session.sendMessage('Hello');
} catch (e) {
  done('error', { error: String(e) });
}
