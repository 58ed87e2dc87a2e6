// The event queue: every event is kept in localStorage until the server acknowledges it.
//
// Events carry a client-generated id; the server ignores an id it already stored, so a retry after a
// lost acknowledgement (or a page reload that re-sends the stored queue) never duplicates a row.
// A browser that closes mid-flight re-sends what is left the next time the link is opened.

export function randomId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export class EventQueue {
  constructor(token, onStatus) {
    this.token = token;
    this.key = `empower-study-queue-${token}`;
    this.onStatus = onStatus;
    this.items = JSON.parse(localStorage.getItem(this.key) || "[]");
    this.busy = false;
    this.delay = 500;
    this.timer = null;
    this.waiters = [];
    window.addEventListener("pagehide", () => this.beacon());
    window.addEventListener("online", () => this.flush());
  }

  push(event) {
    this.items.push({ client_id: randomId(), client_ms: Date.now(), ...event });
    this.save();
    this.schedule(150);
  }

  save() {
    localStorage.setItem(this.key, JSON.stringify(this.items));
    this.onStatus(this.items.length ? `saving ${this.items.length}…` : "all saved");
  }

  schedule(ms) {
    if (this.timer === null) this.timer = setTimeout(() => { this.timer = null; this.flush(); }, ms);
  }

  // Resolves once every queued event is acknowledged (before submitting a task).
  drained() {
    if (!this.items.length) return Promise.resolve();
    this.flush();
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  async flush() {
    if (this.busy || !this.items.length) return this.settle();
    this.busy = true;
    const batch = this.items.slice(0, 200);
    try {
      const response = await fetch("/api/events", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ token: this.token, events: batch }),
      });
      if (response.ok) {
        const acked = new Set((await response.json()).acked);
        this.items = this.items.filter((e) => !acked.has(e.client_id));
        this.delay = 500;
      } else if (response.status >= 400 && response.status < 500 && response.status !== 429) {
        // The server refused the batch as malformed: retrying cannot help. Keep it aside, visibly.
        const detail = await response.text();
        console.error("events refused", response.status, detail);
        const refused = JSON.parse(localStorage.getItem(`${this.key}-refused`) || "[]");
        localStorage.setItem(`${this.key}-refused`, JSON.stringify(refused.concat(batch)));
        const ids = new Set(batch.map((e) => e.client_id));
        this.items = this.items.filter((e) => !ids.has(e.client_id));
      } else {
        throw new Error(`server answered ${response.status}`);
      }
      this.save();
    } catch (err) {
      this.onStatus(`offline: ${this.items.length} event(s) kept, retrying`);
      this.delay = Math.min(this.delay * 2, 10000);
    } finally {
      this.busy = false;
    }
    if (this.items.length) this.schedule(this.delay);
    this.settle();
  }

  settle() {
    if (!this.items.length) this.waiters.splice(0).forEach((resolve) => resolve());
  }

  beacon() {
    if (!this.items.length || !navigator.sendBeacon) return;
    const body = JSON.stringify({ token: this.token, events: this.items.slice(0, 200) });
    navigator.sendBeacon("/api/events", new Blob([body], { type: "application/json" }));
  }
}
