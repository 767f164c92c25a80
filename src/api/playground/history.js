// Undo and redo over edit states. States are never changed in place (editor.js returns new
// ones), so keeping the old ones is all undo needs.

/** The present state, with the states before it (undo) and after it (redo). */
export class History {
  constructor(present) {
    this.present = present;
    this.past = [];
    this.future = [];
  }

  /** Makes `state` the present; what had been undone is dropped. */
  push(state) {
    this.past.push(this.present);
    this.present = state;
    this.future = [];
  }

  /** Steps back; false when there is nothing to undo. */
  undo() {
    if (!this.past.length) return false;
    this.future.push(this.present);
    this.present = this.past.pop();
    return true;
  }

  /** Steps forward again; false when there is nothing to redo. */
  redo() {
    if (!this.future.length) return false;
    this.past.push(this.present);
    this.present = this.future.pop();
    return true;
  }

  get canUndo() {
    return this.past.length > 0;
  }

  get canRedo() {
    return this.future.length > 0;
  }
}
