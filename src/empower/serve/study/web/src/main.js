// The study page: task, editor with inline suggestions, run/submit buttons, and the closing survey.
//
// Every edit is logged as insert/delete events in transaction order (positions in the buffer as it
// was just before that change), an accepted suggestion as one suggestion_accepted event, so the
// server can replay the buffer exactly. `origin` mirrors the buffer and records, for each character,
// the suggestion it came from: deletions report how many suggested characters they removed.
import { defaultKeymap, history, historyKeymap } from "@codemirror/commands";
import { python } from "@codemirror/lang-python";
import { bracketMatching, defaultHighlightStyle, indentOnInput, indentUnit, syntaxHighlighting } from "@codemirror/language";
import { EditorState } from "@codemirror/state";
import { EditorView, drawSelection, highlightActiveLine, highlightActiveLineGutter, keymap, lineNumbers } from "@codemirror/view";
import { acceptedGhost, dismissal, ghostField, ghostText, setGhost } from "./ghost.js";
import { EventQueue, randomId } from "./queue.js";

const token = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
const $ = (id) => document.getElementById(id);
const saveStatus = (text) => { $("save-status").textContent = text; };
const queue = new EventQueue(token, saveStatus);

async function api(path, body, signal) {
  const response = await fetch(path, {
    method: body ? "POST" : "GET",
    headers: body ? { "Content-Type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
    signal,
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.detail || `server answered ${response.status}`);
  return data;
}

class Session {
  constructor(info, current, debounceMs) {
    this.id = current.session_id;
    this.info = info;
    this.debounceMs = debounceMs;
    const seqKey = `empower-study-seq-${token}-${this.id}`;
    this.seqKey = seqKey;
    this.seq = Math.max(current.next_seq, Number(localStorage.getItem(seqKey) || 0));
    this.origin = Array.from(current.code, () => null); // suggestion id per character
    this.requestNo = 0;
    this.docVersion = 0;
    this.timer = null;
    this.abort = null;
    this.view = new EditorView({
      parent: $("editor"),
      state: EditorState.create({
        doc: current.code,
        extensions: [
          lineNumbers(), highlightActiveLineGutter(), highlightActiveLine(), history(), drawSelection(),
          indentOnInput(), bracketMatching(), indentUnit.of("    "), python(),
          syntaxHighlighting(defaultHighlightStyle, { fallback: true }),
          ghostText(), keymap.of([...defaultKeymap, ...historyKeymap]), EditorView.lineWrapping,
          EditorView.updateListener.of((update) => this.onUpdate(update)),
        ],
      }),
    });
    this.view.dispatch({ selection: { anchor: current.code.length }, scrollIntoView: true });
    this.view.focus();
  }

  log(kind, fields = {}) {
    this.seq += 1;
    localStorage.setItem(this.seqKey, String(this.seq));
    queue.push({ session_id: this.id, seq: this.seq - 1, kind, caret: this.view.state.selection.main.head, ...fields });
  }

  onUpdate(update) {
    let edited = false;
    for (const tr of update.transactions) {
      const gone = dismissal(tr);
      if (gone) {
        const kind = gone.reason === "rejected" ? "suggestion_rejected" : "suggestion_dismissed";
        this.log(kind, { suggestion_id: gone.ghost.id, position: gone.ghost.pos, data: { reason: gone.reason, typed: gone.ghost.typed } });
      }
      if (!tr.docChanged) continue;
      edited = true;
      const accepted = tr.annotation(acceptedGhost);
      if (accepted) {
        this.origin.splice(accepted.pos, 0, ...Array.from(accepted.text, () => accepted.id));
        this.log("suggestion_accepted", { suggestion_id: accepted.id, position: accepted.pos, text: accepted.text, data: { typed: accepted.typed } });
        continue;
      }
      tr.changes.iterChanges((fromA, toA, fromB, _toB, inserted) => {
        if (toA > fromA) {
          const removed = this.origin.splice(fromB, toA - fromA);
          const fromSuggestion = removed.filter((id) => id !== null).length;
          this.log("delete", { position: fromB, deleted_text: tr.startState.doc.sliceString(fromA, toA), deleted_from_suggestion: fromSuggestion });
        }
        if (inserted.length) {
          const text = inserted.toString();
          this.origin.splice(fromB, 0, ...Array.from(text, () => null));
          this.log("insert", { position: fromB, text });
        }
      });
    }
    if (edited) {
      this.docVersion += 1;
      this.schedule();
    } else if (update.selectionSet) {
      this.cancel();
    }
  }

  cancel() {
    clearTimeout(this.timer);
    this.requestNo += 1;
    if (this.abort) this.abort.abort();
    $("assistant-status").textContent = "";
  }

  schedule() {
    this.cancel();
    this.timer = setTimeout(() => this.request(), this.debounceMs);
  }

  async request() {
    const state = this.view.state;
    const caret = state.selection.main;
    if (!caret.empty || state.field(ghostField)) return;
    const mine = ++this.requestNo;
    const version = this.docVersion;
    this.abort = new AbortController();
    $("assistant-status").textContent = "thinking…";
    let answer;
    try {
      answer = await api("/api/suggest", { token, session_id: this.id, state: state.doc.sliceString(0, caret.head) }, this.abort.signal);
    } catch (err) {
      if (mine === this.requestNo) $("assistant-status").textContent = "";
      return;
    }
    if (mine !== this.requestNo || version !== this.docVersion || this.view.state.selection.main.head !== caret.head) return;
    $("assistant-status").textContent = "";
    if (!answer.suggestion_id || !answer.text) return;
    const ghost = { id: answer.suggestion_id, text: answer.text, pos: caret.head, typed: 0 };
    this.view.dispatch({ effects: setGhost.of(ghost) });
    this.log("suggestion_shown", { suggestion_id: ghost.id, position: ghost.pos, text: ghost.text });
  }

  codeEvent() {
    this.seq += 1;
    localStorage.setItem(this.seqKey, String(this.seq));
    return { token, session_id: this.id, client_id: randomId(), seq: this.seq - 1,
      client_ms: Date.now(), caret: this.view.state.selection.main.head, code: this.view.state.doc.toString() };
  }

  destroy() {
    this.cancel();
    this.view.destroy();
  }
}

function showResult(result) {
  const box = $("output");
  box.className = `output ${result.passed ? "passed" : "failed"}`;
  const lines = [result.passed ? "✓ All public tests passed" : `✗ ${result.status}`];
  if (result.message) lines.push(result.message);
  if (result.first_failure) {
    for (const [key, value] of Object.entries(result.first_failure)) lines.push(`${key}: ${typeof value === "string" ? value : JSON.stringify(value)}`);
  }
  box.textContent = lines.join("\n");
}

let session = null;

async function load() {
  await queue.drained();
  const state = await api(`/api/participant/${encodeURIComponent(token)}`);
  $("study-name").textContent = state.study;
  if (session) { session.destroy(); session = null; }
  const done = state.sessions.filter((s) => s.finished).length;
  $("progress").textContent = `task ${Math.min(done + 1, state.sessions.length)} of ${state.sessions.length}`;
  for (const id of ["task-view", "survey-view", "thanks-view"]) $(id).hidden = true;
  if (state.current) {
    const info = state.sessions.find((s) => s.id === state.current.session_id);
    $("assistant-name").textContent = info.assistant;
    $("assistant-name").hidden = false;
    $("task-title").textContent = `Task ${info.index + 1}`;
    $("statement").textContent = info.statement;
    $("output").textContent = "Run the public tests to see results here.";
    $("output").className = "output";
    $("task-view").hidden = false;
    session = new Session(info, state.current, state.debounce_ms);
  } else if (!state.survey_done) {
    $("assistant-name").hidden = true;
    $("progress").textContent = "survey";
    renderSurvey(state.survey);
    $("survey-view").hidden = false;
  } else {
    $("assistant-name").hidden = true;
    $("progress").textContent = "done";
    $("thanks-view").hidden = false;
  }
}

function renderSurvey(survey) {
  const form = $("survey-questions");
  form.replaceChildren();
  for (const [name, text] of Object.entries(survey.questions)) {
    const fieldset = document.createElement("fieldset");
    const legend = document.createElement("legend");
    legend.textContent = text;
    fieldset.append(legend);
    for (const position of survey.positions) {
      const label = document.createElement("label");
      const input = document.createElement("input");
      Object.assign(input, { type: "radio", name, value: String(position), required: true });
      label.append(input, ` Assistant ${position}`);
      fieldset.append(label);
    }
    form.append(fieldset);
  }
}

async function withButton(button, work) {
  button.disabled = true;
  try { await work(); } catch (err) { $("output").className = "output failed"; $("output").textContent = String(err.message || err); } finally { button.disabled = false; }
}

$("run").addEventListener("click", () => withButton($("run"), async () => {
  $("output").className = "output";
  $("output").textContent = "Running the public tests…";
  showResult(await api("/api/run", session.codeEvent()));
}));

$("submit").addEventListener("click", () => withButton($("submit"), async () => {
  $("output").textContent = "Submitting…";
  await queue.drained();
  await api("/api/finish", session.codeEvent());
  await load();
}));

$("survey-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const data = new FormData($("survey-form"));
  withButton($("survey-submit"), async () => {
    await api("/api/survey", { token, enjoy: Number(data.get("enjoy")), relevant: Number(data.get("relevant")), comment: data.get("comment") || "" });
    await load();
  });
});

load().catch((err) => {
  $("fatal").hidden = false;
  $("fatal").textContent = `Could not open the study: ${err.message}`;
});
window.study = { queue, get session() { return session; } };
