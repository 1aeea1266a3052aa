// A client in the shape of the Conduit docs' ConduitRealTimeAudio class: the npm
// `ws` package with the Authorization header in the constructor options.
import WebSocket from 'ws';

export class ConduitRealTimeAudio {
  constructor(apiKey, model, provider, baseUrl) {
    this.apiKey = apiKey;
    this.model = model;
    this.provider = provider;
    this.baseUrl = baseUrl;
    this.ws = null;
    this.isConnected = false;
  }

  connect() {
    const url = `${this.baseUrl}/v1/realtime/connect?model=${this.model}&provider=${this.provider}`;
    this.ws = new WebSocket(url, { headers: { Authorization: `Bearer ${this.apiKey}` } });
    this.ws.on('open', () => { this.isConnected = true; this.onOpen(); });
    this.ws.on('message', (data, isBinary) => this.handleMessage(data, isBinary));
    this.ws.on('close', (code, reason) => { this.isConnected = false; this.onClose(code, reason.toString()); });
    this.ws.on('error', (error) => this.onError(error));
  }

  handleMessage(data, isBinary) {
    if (isBinary) this.onAudioData(data);
    else this.onTextMessage(data.toString());
  }

  send(data, options) { this.ws.send(data, options); }
  sendText(message) { this.send(JSON.stringify(message)); }
  sendAudio(buffer) { this.send(buffer); }
  disconnect() { if (this.ws) { this.ws.close(); } }

  onOpen() {}
  onTextMessage(_message) {}
  onAudioData(_buffer) {}
  onClose(_code, _reason) {}
  onError(_error) {}
}

// The docs' ResilientRealTimeAudio policy: reconnect with backoff unless the close
// code says not to (1000, 1002, 4001).
export class ResilientRealTimeAudio extends ConduitRealTimeAudio {
  constructor(apiKey, model, provider, baseUrl, options = {}) {
    super(apiKey, model, provider, baseUrl);
    this.reconnectAttempts = 0;
    this.maxReconnectAttempts = options.maxReconnectAttempts || 5;
    this.reconnectDelay = options.reconnectDelay || 100;
    this.connects = 0;
    this.closes = [];
  }

  connect() {
    this.connects += 1;
    super.connect();
  }

  onClose(code, reason) {
    this.closes.push([code, reason]);
    if (this.shouldReconnect(code)) this.attemptReconnect();
  }

  onError(_error) {
    if (!this.isConnected) this.attemptReconnect();
  }

  shouldReconnect(code) {
    return code !== 1000 && code !== 1002 && code !== 4001;
  }

  attemptReconnect() {
    if (this.reconnectAttempts >= this.maxReconnectAttempts) return;
    this.reconnectAttempts += 1;
    const delay = this.reconnectDelay * Math.pow(2, this.reconnectAttempts - 1);
    setTimeout(() => this.connect(), delay);
  }
}
