import { type CelEnv, type CelInput, type CelType, CelScalar, celEnv, isCelError, mapType, objectType, parse, plan } from "@bufbuild/cel";
import { strings } from "@bufbuild/cel/ext";
import type { JsonObject } from "@bufbuild/protobuf";
import { TimestampSchema } from "@bufbuild/protobuf/wkt";

/** The names a `when` condition may use, with what they hold. */
export const conditionVariables = ["request", "identity", "host", "service", "method", "now"] as const;

/** Values bound to {@link conditionVariables} for one evaluation. */
export type ConditionBindings = Record<string, CelInput>;

/** The result of evaluating a condition: true, false, or why it could not be evaluated. */
export type ConditionResult = { readonly kind: "true" } | { readonly kind: "false" } | { readonly kind: "error"; readonly message: string };

/** A `when` condition checked and planned once at load time. */
export interface CompiledCondition {
  /** The expression as written. */
  readonly source: string;
  /** Whether evaluating it reads the `request` variable (so the request must be decoded). */
  readonly referencesRequest: boolean;
  evaluate(bindings: ConditionBindings): ConditionResult;
}

/** A condition that does not parse or does not type-check; the message says why. */
export class ConditionError extends Error {
  override name = "ConditionError";
}

// The runtime declarations. Request fields are unknown to policy (any message may
// flow through the sidecar), so `request` is a map of dyn.
const env: CelEnv = celEnv({
  variables: {
    request: mapType(CelScalar.STRING, CelScalar.DYN),
    identity: mapType(CelScalar.STRING, CelScalar.DYN),
    host: CelScalar.STRING,
    service: CelScalar.STRING,
    method: CelScalar.STRING,
    now: objectType(TimestampSchema),
  },
  funcs: strings,
});

// The checker's own view of types. It exists because @bufbuild/cel 0.6 exports no
// type checker: without one, an unknown variable or function, or `1 + "a"`, only
// fails at run time, i.e. on a live call. `record` is a map whose keys are known,
// so a typo such as `identity.onBehalfOf` is a load error, not a denied call.
type StaticType =
  | { readonly kind: "dyn" }
  | { readonly kind: "scalar"; readonly name: string }
  | { readonly kind: "list"; readonly element: StaticType }
  | { readonly kind: "map"; readonly value: StaticType }
  | { readonly kind: "object"; readonly name: string }
  | { readonly kind: "record"; readonly name: string; readonly fields: ReadonlyMap<string, StaticType> };

const dyn: StaticType = { kind: "dyn" };
const boolType: StaticType = { kind: "scalar", name: "bool" };
const stringType: StaticType = { kind: "scalar", name: "string" };
const intType: StaticType = { kind: "scalar", name: "int" };
const typeType: StaticType = { kind: "scalar", name: "type" };
const timestampType = { kind: "object", name: "google.protobuf.Timestamp" } as const satisfies StaticType;
const durationType = { kind: "object", name: "google.protobuf.Duration" } as const satisfies StaticType;

const globalTypes: ReadonlyMap<string, StaticType> = new Map<string, StaticType>([
  ["request", { kind: "map", value: dyn }],
  [
    "identity",
    {
      kind: "record",
      name: "identity",
      fields: new Map<string, StaticType>([
        ["agent", stringType],
        ["on_behalf_of", stringType],
        ["chain", { kind: "list", element: stringType }],
        ["authenticated_by", stringType],
      ]),
    },
  ],
  ["host", stringType],
  ["service", stringType],
  ["method", stringType],
  ["now", timestampType],
]);

// Type names are values in CEL (`type(x) == string`).
const typeNames = new Set(["int", "uint", "double", "bool", "string", "bytes", "null_type", "type", "list", "map", "dyn"]);
const numericNames = new Set(["int", "uint", "double"]);

const operatorNames: Readonly<Record<string, string>> = {
  "_+_": "+",
  "_-_": "-",
  "_*_": "*",
  "_/_": "/",
  "_%_": "%",
  "-_": "unary -",
  "!_": "!",
  "_<_": "<",
  "_<=_": "<=",
  "_>_": ">",
  "_>=_": ">=",
  "_==_": "==",
  "_!=_": "!=",
  "@in": "in",
};

type ParsedExpression = ReturnType<typeof parse>;
type Expr = ParsedExpression["expr"];
type Scope = ReadonlyMap<string, StaticType>;

function fromCelType(type: CelType): StaticType {
  switch (type.kind) {
    case "scalar":
      return type.scalar === "dyn" ? dyn : { kind: "scalar", name: type.scalar };
    case "list":
      return { kind: "list", element: fromCelType(type.element) };
    case "map":
      return { kind: "map", value: fromCelType(type.value) };
    case "object":
      return { kind: "object", name: type.name };
  }
}

function describe(type: StaticType): string {
  switch (type.kind) {
    case "dyn":
      return "dyn";
    case "scalar":
    case "object":
    case "record":
      return type.name;
    case "list":
      return `list(${describe(type.element)})`;
    case "map":
      return `map(string, ${describe(type.value)})`;
  }
}

/** Whether a value of type `actual` may be passed where `expected` is declared. */
function accepts(expected: StaticType, actual: StaticType): boolean {
  if (expected.kind === "dyn" || actual.kind === "dyn") return true;
  switch (expected.kind) {
    case "scalar":
    case "object":
      return actual.kind === expected.kind && actual.name === expected.name;
    case "list":
      return actual.kind === "list";
    case "map":
      return actual.kind === "map" || actual.kind === "record";
    case "record":
      return false;
  }
}

// CEL compares numbers across int, uint and double, and anything with null;
// other mixed comparisons are always false at run time, so they are typos.
function comparable(left: StaticType, right: StaticType): boolean {
  if (left.kind === "dyn" || right.kind === "dyn") return true;
  if (left.kind === "scalar" && right.kind === "scalar") {
    if (left.name === "null_type" || right.name === "null_type") return true;
    if (numericNames.has(left.name) && numericNames.has(right.name)) return true;
    return left.name === right.name;
  }
  if (left.kind === "scalar" && left.name === "null_type") return true;
  if (right.kind === "scalar" && right.name === "null_type") return true;
  const mapLike = (type: StaticType): boolean => type.kind === "map" || type.kind === "record";
  if (mapLike(left) && mapLike(right)) return true;
  if (left.kind === "list" && right.kind === "list") return true;
  return left.kind === "object" && right.kind === "object" && left.name === right.name;
}

function isBoolLike(type: StaticType): boolean {
  return type.kind === "dyn" || (type.kind === "scalar" && type.name === "bool");
}

function join(left: StaticType, right: StaticType): StaticType {
  return describe(left) === describe(right) ? left : dyn;
}

/** `a.b.c` when the expression is only identifiers and selections, else undefined. */
function qualifiedName(expr: Expr): string | undefined {
  const kind = expr.exprKind;
  if (kind.case === "identExpr") return kind.value.name;
  if (kind.case === "selectExpr" && !kind.value.testOnly && kind.value.operand !== undefined) {
    const operand = qualifiedName(kind.value.operand);
    return operand === undefined ? undefined : `${operand}.${kind.value.field}`;
  }
  return undefined;
}

class Checker {
  referencesRequest = false;

  check(expr: Expr | undefined, scope: Scope): StaticType {
    if (expr === undefined) throw new ConditionError("incomplete expression");
    const kind = expr.exprKind;
    switch (kind.case) {
      case "constExpr":
        switch (kind.value.constantKind.case) {
          case "boolValue":
            return boolType;
          case "int64Value":
            return intType;
          case "uint64Value":
            return { kind: "scalar", name: "uint" };
          case "doubleValue":
            return { kind: "scalar", name: "double" };
          case "stringValue":
            return stringType;
          case "bytesValue":
            return { kind: "scalar", name: "bytes" };
          case "nullValue":
            return { kind: "scalar", name: "null_type" };
          case "durationValue":
            return durationType;
          case "timestampValue":
            return timestampType;
          case undefined:
            throw new ConditionError("empty constant");
        }
        break;
      case "identExpr":
        return this.ident(kind.value.name, scope);
      case "selectExpr":
        return this.select(this.check(kind.value.operand, scope), kind.value.field, kind.value.testOnly);
      case "callExpr":
        return this.call(kind.value.function, kind.value.target, kind.value.args, scope);
      case "listExpr": {
        let element: StaticType | undefined;
        for (const item of kind.value.elements) {
          const type = this.check(item, scope);
          element = element === undefined ? type : join(element, type);
        }
        return { kind: "list", element: element ?? dyn };
      }
      case "structExpr":
        for (const entry of kind.value.entries) {
          if (entry.keyKind.case === "mapKey") this.check(entry.keyKind.value, scope);
          this.check(entry.value, scope);
        }
        if (kind.value.messageName === "") return { kind: "map", value: dyn };
        return kind.value.messageName === timestampType.name || kind.value.messageName === durationType.name
          ? { kind: "object", name: kind.value.messageName }
          : dyn;
      case "comprehensionExpr": {
        const comprehension = kind.value;
        const range = this.check(comprehension.iterRange, scope);
        let first: StaticType;
        let second: StaticType;
        if (range.kind === "list") [first, second] = [intType, range.element];
        else if (range.kind === "map") [first, second] = [stringType, range.value];
        else if (range.kind === "record") [first, second] = [stringType, dyn];
        else if (range.kind === "dyn") [first, second] = [dyn, dyn];
        else throw new ConditionError(`cannot iterate over ${describe(range)}`);
        // With one variable, a list yields its elements; with two, index and element.
        const iterType = comprehension.iterVar2 === "" && range.kind === "list" ? second : first;
        this.check(comprehension.accuInit, scope);
        const inner = new Map(scope);
        inner.set(comprehension.iterVar, iterType);
        if (comprehension.iterVar2 !== "") inner.set(comprehension.iterVar2, second);
        // The accumulator's type changes with the macro (bool for all/exists, list for map/filter).
        inner.set(comprehension.accuVar, dyn);
        this.check(comprehension.loopCondition, inner);
        this.check(comprehension.loopStep, inner);
        return this.check(comprehension.result, inner);
      }
      case undefined:
        throw new ConditionError("empty expression");
    }
    return dyn;
  }

  private ident(name: string, scope: Scope): StaticType {
    const local = scope.get(name);
    if (local !== undefined) return local;
    const global = globalTypes.get(name);
    if (global !== undefined) {
      if (name === "request") this.referencesRequest = true;
      return global;
    }
    if (typeNames.has(name)) return typeType;
    throw new ConditionError(`unknown variable "${name}" (available: ${conditionVariables.join(", ")})`);
  }

  private select(operand: StaticType, field: string, testOnly: boolean): StaticType {
    let type: StaticType;
    switch (operand.kind) {
      case "dyn":
        type = dyn;
        break;
      case "map":
        type = operand.value;
        break;
      case "record": {
        const known = operand.fields.get(field);
        if (known === undefined) {
          throw new ConditionError(`${operand.name} has no field "${field}" (fields: ${[...operand.fields.keys()].join(", ")})`);
        }
        type = known;
        break;
      }
      default:
        throw new ConditionError(`cannot select field "${field}" from a ${describe(operand)}`);
    }
    return testOnly ? boolType : type;
  }

  private call(name: string, target: Expr | undefined, argExprs: readonly Expr[], scope: Scope): StaticType {
    // `strings.quote(x)` parses as a method call on the identifier `strings`.
    if (target !== undefined) {
      const qualifier = qualifiedName(target);
      const root = qualifier?.split(".")[0];
      if (qualifier !== undefined && root !== undefined && !scope.has(root) && !globalTypes.has(root) && env.funcs.find(`${qualifier}.${name}`) !== undefined) {
        return this.overload(`${qualifier}.${name}`, undefined, argExprs.map((arg) => this.check(arg, scope)));
      }
    }
    const targetType = target === undefined ? undefined : this.check(target, scope);
    const args = argExprs.map((arg) => this.check(arg, scope));
    switch (name) {
      case "_&&_":
      case "_||_":
        for (const arg of args) {
          if (!isBoolLike(arg)) throw new ConditionError(`${name === "_&&_" ? "&&" : "||"} needs bool operands, got ${describe(arg)}`);
        }
        return boolType;
      case "_?_:_": {
        const [condition, whenTrue, whenFalse] = args;
        if (condition === undefined || whenTrue === undefined || whenFalse === undefined) throw new ConditionError("incomplete conditional");
        if (!isBoolLike(condition)) throw new ConditionError(`the condition of ?: must be a bool, got ${describe(condition)}`);
        return join(whenTrue, whenFalse);
      }
      case "_[_]":
      case "_[?_]":
        return this.index(args, argExprs[1], name === "_[?_]");
      case "@not_strictly_false":
      case "__not_strictly_false__":
        return boolType;
      case "_==_":
      case "_!=_": {
        const [left, right] = args;
        if (left !== undefined && right !== undefined && !comparable(left, right)) {
          throw new ConditionError(`cannot compare ${describe(left)} ${operatorNames[name] ?? name} ${describe(right)}`);
        }
        return boolType;
      }
      default:
        return this.overload(name, targetType, args);
    }
  }

  private index(args: readonly StaticType[], key: Expr | undefined, optional: boolean): StaticType {
    const [operand, keyType] = args;
    if (operand === undefined || keyType === undefined) throw new ConditionError("incomplete index expression");
    let type: StaticType;
    switch (operand.kind) {
      case "dyn":
        type = dyn;
        break;
      case "list":
        if (!accepts(intType, keyType) && !(keyType.kind === "scalar" && numericNames.has(keyType.name))) {
          throw new ConditionError(`a list index must be a number, got ${describe(keyType)}`);
        }
        type = operand.element;
        break;
      case "map":
        type = operand.value;
        break;
      case "record": {
        const constant = key?.exprKind.case === "constExpr" ? key.exprKind.value.constantKind : undefined;
        if (constant?.case === "stringValue") return this.select(operand, constant.value, false);
        type = dyn;
        break;
      }
      default:
        throw new ConditionError(`cannot index a ${describe(operand)}`);
    }
    return optional ? dyn : type;
  }

  private overload(name: string, target: StaticType | undefined, args: readonly StaticType[]): StaticType {
    const display = operatorNames[name] ?? name;
    const group = env.funcs.find(name);
    if (group === undefined) throw new ConditionError(`unknown function "${display}"`);
    const shaped = [...group].filter((func) => (func.target !== undefined) === (target !== undefined) && func.arguments.length === args.length);
    if (shaped.length === 0) {
      const form = target === undefined ? "a function" : "a method";
      throw new ConditionError(`"${display}" cannot be called as ${form} with ${args.length} argument(s)`);
    }
    const matching = shaped.filter(
      (func) =>
        (target === undefined || func.target === undefined || accepts(fromCelType(func.target), target)) &&
        func.arguments.every((param, i) => {
          const arg = args[i];
          return arg !== undefined && accepts(fromCelType(param), arg);
        }),
    );
    if (matching.length === 0) {
      const applied = [...(target === undefined ? [] : [target]), ...args].map(describe).join(", ");
      throw new ConditionError(`no overload of "${display}" accepts (${applied})`);
    }
    const results = matching.map((func) => fromCelType(func.result));
    const [first] = results;
    return first !== undefined && results.every((type) => describe(type) === describe(first)) ? first : dyn;
  }
}

/**
 * Parses, type-checks and plans a `when` condition. Throws {@link ConditionError} with
 * a message for humans when it does not parse, uses an unknown variable, field of
 * `identity` or function, applies an operator to types it cannot take, or does not
 * yield a bool.
 *
 * `request` is protobuf JSON, which shapes what conditions can assume:
 * - numbers are CEL doubles: comparisons with int literals work (`request.limit > 100`),
 *   arithmetic needs a conversion (`int(request.limit) + 1`);
 * - 64-bit integers are JSON strings, so compare them as `int(request.id) > 5`;
 * - a field left at its default value is absent unless the decoder emits defaults,
 *   and reading an absent field is a run-time error (which fails closed); test with
 *   `has(request.field)` where absence is normal.
 */
export function compileCondition(source: string): CompiledCondition {
  let parsed: ParsedExpression;
  try {
    parsed = parse(source);
  } catch (error) {
    throw new ConditionError(`syntax error: ${error instanceof Error ? error.message.replace(/^<input>:/, "at ") : String(error)}`);
  }
  const checker = new Checker();
  const type = checker.check(parsed.expr, new Map());
  if (!isBoolLike(type)) throw new ConditionError(`a condition must yield a bool, this one yields ${describe(type)}`);
  let program: ReturnType<typeof plan<Record<string, CelType>>>;
  try {
    program = plan(env, parsed);
  } catch (error) {
    throw new ConditionError(error instanceof Error ? error.message : String(error));
  }
  return {
    source,
    referencesRequest: checker.referencesRequest,
    evaluate(bindings) {
      let value: unknown;
      try {
        value = program(bindings);
      } catch (error) {
        // plan's programs return errors rather than throw; this guards a library bug from letting a call through.
        return { kind: "error", message: error instanceof Error ? error.message : String(error) };
      }
      if (value === true) return { kind: "true" };
      if (value === false) return { kind: "false" };
      if (isCelError(value)) return { kind: "error", message: value.message };
      return { kind: "error", message: `the condition yielded ${typeof value}, not a bool` };
    },
  };
}

/** The CEL value of a caller's identity; an absent identity is empty strings and an empty chain. */
export function identityBinding(identity: { agent: string; onBehalfOf: string; chain: readonly string[]; authenticatedBy: string } | undefined): CelInput {
  return {
    agent: identity?.agent ?? "",
    on_behalf_of: identity?.onBehalfOf ?? "",
    chain: identity?.chain ?? [],
    authenticated_by: identity?.authenticatedBy ?? "",
  };
}

/** The CEL value of a decoded request. */
export function requestBinding(request: JsonObject): CelInput {
  return request;
}
