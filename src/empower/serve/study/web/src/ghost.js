// Inline ghost-text suggestions for CodeMirror 6.
//
// The ghost is a widget decoration at the caret holding the suggestion's text. Tab inserts it
// (accept), Esc removes it (reject). Typing the ghost's next characters keeps it and shortens it
// ("typing through"); typing anything else, or moving the caret away, dismisses it. A ghost that is
// typed through to its end is dismissed too (reason "typed_through"): the participant wrote it.
import { Annotation, Prec, StateEffect, StateField, Transaction } from "@codemirror/state";
import { Decoration, EditorView, WidgetType, keymap } from "@codemirror/view";

export const setGhost = StateEffect.define(); // {id, text, pos, typed}
export const clearGhost = StateEffect.define(); // reason string
export const acceptedGhost = Annotation.define(); // the ghost that a transaction accepted

class GhostWidget extends WidgetType {
  constructor(text) {
    super();
    this.text = text;
  }
  eq(other) {
    return other.text === this.text;
  }
  toDOM() {
    const span = document.createElement("span");
    span.className = "cm-ghost";
    span.setAttribute("aria-hidden", "true");
    span.textContent = this.text;
    return span;
  }
}

// The text a transaction inserted at `pos` if that was its only change (typing at the caret).
function insertedAt(tr, pos) {
  let inserted = null;
  let changes = 0;
  tr.changes.iterChanges((fromA, toA, _fromB, _toB, text) => {
    changes += 1;
    if (fromA === pos && toA === fromA) inserted = text.toString();
  });
  return changes === 1 ? inserted : null;
}

export const ghostField = StateField.define({
  create: () => null,
  update(ghost, tr) {
    for (const effect of tr.effects) {
      if (effect.is(setGhost)) return effect.value;
      if (effect.is(clearGhost)) return null;
    }
    if (!ghost) return null;
    if (tr.docChanged) {
      const typed = insertedAt(tr, ghost.pos);
      if (typed && typed.length < ghost.text.length && ghost.text.startsWith(typed)) {
        return { ...ghost, pos: ghost.pos + typed.length, text: ghost.text.slice(typed.length), typed: ghost.typed + typed.length };
      }
      return null;
    }
    if (tr.selection && tr.state.selection.main.head !== ghost.pos) return null;
    return ghost;
  },
  provide: (field) =>
    EditorView.decorations.from(field, (ghost) =>
      ghost
        ? Decoration.set([Decoration.widget({ widget: new GhostWidget(ghost.text), side: 1 }).range(ghost.pos)])
        : Decoration.none,
    ),
});

// Why a ghost present before `tr` is gone after it (null if it is still there or was accepted).
export function dismissal(tr) {
  const before = tr.startState.field(ghostField);
  const after = tr.state.field(ghostField);
  if (!before || (after && after.id === before.id) || tr.annotation(acceptedGhost)) return null;
  for (const effect of tr.effects) if (effect.is(clearGhost)) return { ghost: before, reason: effect.value };
  if (tr.docChanged) {
    const typed = insertedAt(tr, before.pos);
    return { ghost: before, reason: typed === before.text ? "typed_through" : "typed_other" };
  }
  return { ghost: before, reason: "caret_moved" };
}

function accept(view) {
  const ghost = view.state.field(ghostField);
  if (!ghost) return false;
  view.dispatch({
    changes: { from: ghost.pos, insert: ghost.text },
    selection: { anchor: ghost.pos + ghost.text.length },
    effects: clearGhost.of("accepted"),
    annotations: [acceptedGhost.of(ghost), Transaction.userEvent.of("input.complete")],
    scrollIntoView: true,
  });
  return true;
}

function reject(view) {
  if (!view.state.field(ghostField)) return false;
  view.dispatch({ effects: clearGhost.of("rejected") });
  return true;
}

// Tab without a ghost indents to the next multiple of four columns (Python code).
function indent(view) {
  const { state } = view;
  const range = state.selection.main;
  const column = range.head - state.doc.lineAt(range.head).from;
  view.dispatch(state.replaceSelection(" ".repeat(4 - (column % 4))), { userEvent: "input" });
  return true;
}

export function ghostText() {
  return [
    ghostField,
    Prec.highest(
      keymap.of([
        { key: "Tab", run: (view) => accept(view) || indent(view) },
        { key: "Escape", run: reject },
      ]),
    ),
  ];
}
