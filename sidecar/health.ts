/**
 * `grpc.health.v1.Health` on the agent port, answered by the sidecar itself
 * (never forwarded, no identity needed: Kubernetes gRPC probes and load
 * balancers send none). The service is tiny, so its two messages are encoded
 * by hand instead of loading the health proto.
 * @module
 */
import { Code } from "../common/errors.js";
import type { H2Stream } from "./h2/connection.js";
import { MessageReader, frameMessage, statusResponse } from "./wire.js";

/** The paths of the health service. */
export const healthPaths = { check: "/grpc.health.v1.Health/Check", watch: "/grpc.health.v1.Health/Watch" } as const;

/** `HealthCheckResponse.ServingStatus`. */
export const ServingStatus = { serving: 1, notServing: 2 } as const;

/** A HealthCheckRequest is one string; anything much longer than a service name is not one. */
const maxRequestBytes = 1024;

/**
 * The `service` field (1) of a HealthCheckRequest, or undefined when the bytes
 * are not a well-formed request. Other fields are skipped as protobuf says.
 */
export function healthRequestService(payload: Uint8Array): string | undefined {
  let service = "";
  let i = 0;
  const varint = (): number | undefined => {
    let value = 0;
    for (let shift = 0; shift < 35; shift += 7) {
      const byte = payload[i++];
      if (byte === undefined) return undefined;
      value += (byte & 0x7f) * 2 ** shift;
      if ((byte & 0x80) === 0) return value;
    }
    return undefined;
  };
  while (i < payload.length) {
    const tag = varint();
    if (tag === undefined || tag < 8) return undefined;
    const wire = tag & 7;
    if (wire === 0) {
      if (varint() === undefined) return undefined;
    } else if (wire === 2) {
      const length = varint();
      if (length === undefined || i + length > payload.length) return undefined;
      if (tag >>> 3 === 1) service = Buffer.from(payload.subarray(i, i + length)).toString("utf8");
      i += length;
    } else if (wire === 1 || wire === 5) {
      i += wire === 1 ? 8 : 4;
      if (i > payload.length) return undefined;
    } else {
      return undefined;
    }
  }
  return service;
}

/** Options of {@link serveHealth}. */
export interface HealthOptions {
  /** Whether a service name is one this sidecar fronts (`""` is the sidecar as a whole). */
  readonly knows: (service: string) => boolean;
  /** Whether the sidecar is ready (the same checks as `/readyz`). */
  readonly ready: () => boolean;
}

/**
 * Answers one health call: Check with SERVING or NOT_SERVING (NOT_FOUND for a
 * service the sidecar does not front); Watch with the current status, then the
 * stream stays open until the client cancels it (later changes are not pushed).
 */
export function serveHealth(stream: H2Stream, watch: boolean, options: HealthOptions): void {
  const reader = new MessageReader(maxRequestBytes);
  let answered = false;
  const answer = (payload: Uint8Array | undefined) => {
    if (answered || stream.closed) return;
    answered = true;
    stream.ondata = undefined;
    const service = payload === undefined ? undefined : healthRequestService(payload);
    if (service === undefined) {
      stream.sendHeaders(statusResponse(Code.InvalidArgument, "malformed grpc.health.v1.HealthCheckRequest"), true);
      return;
    }
    if (!options.knows(service)) {
      stream.sendHeaders(statusResponse(Code.NotFound, `unknown service ${service}`), true);
      return;
    }
    const status = options.ready() ? ServingStatus.serving : ServingStatus.notServing;
    stream.sendHeaders(
      [
        [":status", "200"],
        ["content-type", "application/grpc"],
      ],
      false,
    );
    stream.write(frameMessage(Uint8Array.of(0x08, status)));
    if (!watch) stream.sendHeaders([["grpc-status", "0"]], true);
  };
  stream.ondata = (chunk) => {
    try {
      const messages = reader.push(chunk);
      const first = messages[0];
      if (first !== undefined) answer(first.compressed ? undefined : first.payload);
    } catch {
      answer(undefined);
    }
  };
  // A Watch stays open after the client half-closes, until the client cancels it.
  stream.onend = () => answer(undefined);
  stream.resume();
}
