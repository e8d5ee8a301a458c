// The request as JSON, with the fields the policy redacted marked as such.
import type { JsonValue } from "@bufbuild/protobuf";
import { type Child, h } from "../dom.js";

function indent(depth: number): string {
  return "  ".repeat(depth);
}

/**
 * `value` pretty-printed. A value at one of `redacted`'s dotted paths (array
 * elements add no segment, as in the policy's `redact` paths) is shown as a
 * redaction, not as data.
 */
export function jsonView(value: JsonValue | undefined, redacted: readonly string[]): HTMLElement {
  const paths = new Set(redacted);
  const render = (node: JsonValue, path: string, depth: number): Child => {
    if (path !== "" && paths.has(path)) {
      return h("span", { class: "json-redacted", "data-testid": "redacted-value", title: `${path} was redacted by policy before it left the agent's host` }, "redacted");
    }
    if (node === null) return h("span", { class: "json-null" }, "null");
    if (typeof node === "string") return h("span", { class: "json-string" }, JSON.stringify(node));
    if (typeof node === "number") return h("span", { class: "json-number" }, String(node));
    if (typeof node === "boolean") return h("span", { class: "json-bool" }, String(node));
    if (Array.isArray(node)) {
      if (node.length === 0) return "[]";
      return ["[\n", node.map((item, i) => [indent(depth + 1), render(item, path, depth + 1), i < node.length - 1 ? ",\n" : "\n"]), indent(depth), "]"];
    }
    const entries = Object.entries(node);
    if (entries.length === 0) return "{}";
    return [
      "{\n",
      entries.map(([key, item], i) => [
        indent(depth + 1),
        h("span", { class: "json-key" }, JSON.stringify(key)),
        ": ",
        render(item, path === "" ? key : `${path}.${key}`, depth + 1),
        i < entries.length - 1 ? ",\n" : "\n",
      ]),
      indent(depth),
      "}",
    ];
  };
  return h("pre", { class: "json", "data-testid": "request-json", tabindex: 0, "aria-label": "The request as JSON" }, h("code", {}, value === undefined ? "(no request body)" : render(value, "", 0)));
}
