// A tiny DOM builder. Text always goes in as text nodes (never innerHTML), so
// agent-controlled strings such as a request's JSON or reason cannot inject markup.

/** What an element may contain. Falsy children are skipped, arrays are flattened. */
export type Child = Node | string | number | bigint | null | undefined | false | readonly Child[];

/** Attributes: `true` sets an empty attribute, `false`/`null`/`undefined` leave it out. */
export type Attrs = Readonly<Record<string, string | number | boolean | null | undefined>>;

function append(parent: Node, child: Child): void {
  if (child === null || child === undefined || child === false) return;
  if (Array.isArray(child)) {
    for (const c of child as readonly Child[]) append(parent, c);
  } else if (child instanceof Node) {
    parent.appendChild(child);
  } else {
    parent.appendChild(document.createTextNode(String(child as string | number | bigint)));
  }
}

/** Creates an element with attributes and children. */
export function h<K extends keyof HTMLElementTagNameMap>(tag: K, attrs: Attrs = {}, ...children: Child[]): HTMLElementTagNameMap[K] {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) append(element, child);
  return element;
}

/** Replaces every child of `parent`. */
export function replaceChildren(parent: Element, ...children: Child[]): void {
  parent.replaceChildren();
  for (const child of children) append(parent, child);
}

/** Whether a key press happened while typing, so single-key shortcuts must not fire. */
export function isTyping(event: KeyboardEvent): boolean {
  const target = event.target;
  if (!(target instanceof HTMLElement)) return false;
  return target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName);
}

/**
 * j / k (and ArrowDown / ArrowUp) move focus through the links matching
 * `selector` inside `container`. Returns the function that removes the handler.
 */
export function listNavigation(container: HTMLElement, selector: string): () => void {
  const onKey = (event: KeyboardEvent): void => {
    if (event.altKey || event.ctrlKey || event.metaKey || isTyping(event)) return;
    const step = event.key === "j" || event.key === "ArrowDown" ? 1 : event.key === "k" || event.key === "ArrowUp" ? -1 : 0;
    if (step === 0) return;
    const items = [...container.querySelectorAll<HTMLElement>(selector)];
    if (items.length === 0) return;
    const active = document.activeElement;
    const current = items.findIndex((item) => item === active);
    // Arrow keys only take over once focus is in the list, so they still scroll the page otherwise.
    if (current === -1 && event.key.startsWith("Arrow")) return;
    const next = current === -1 ? (step > 0 ? 0 : items.length - 1) : Math.min(items.length - 1, Math.max(0, current + step));
    items[next]?.focus();
    event.preventDefault();
  };
  document.addEventListener("keydown", onKey);
  return () => document.removeEventListener("keydown", onKey);
}
