// How values read on screen.
import { type Timestamp, timestampMs as wktTimestampMs } from "@bufbuild/protobuf/wkt";
import { Risk } from "../../proto/gen/airlock/v1/approval_pb.js";
import { AuditEventType } from "../../proto/gen/airlock/v1/audit_pb.js";
import { RequestState } from "../../proto/gen/airlock/v1/reviewer_pb.js";

/** Epoch milliseconds of a timestamp; 0 when there is none. */
export function timestampMs(ts: Timestamp | undefined): number {
  return ts === undefined ? 0 : wktTimestampMs(ts);
}

export function timestampDate(ts: Timestamp | undefined): Date | undefined {
  return ts === undefined ? undefined : new Date(timestampMs(ts));
}

/** "low" … "critical", or "unknown". */
export function riskName(risk: Risk): string {
  return risk === Risk.UNSPECIFIED ? "unknown" : (Risk[risk]?.toLowerCase() ?? "unknown");
}

/** "pending", "approved", … */
export function stateName(state: RequestState): string {
  return RequestState[state]?.toLowerCase() ?? "unknown";
}

/** The API's query value for each state a request can end in. */
export const outcomes: readonly string[] = ["approved", "denied", "expired", "cancelled", "executing", "completed", "failed"];

/** "vote recorded", "credential issued", … */
export function auditTypeName(type: AuditEventType): string {
  return (AuditEventType[type] ?? "unknown").toLowerCase().replace(/_/g, " ");
}

/** "OpsService.ExportTable" from "demo.v1.OpsService" and "ExportTable". */
export function shortMethod(service: string, method: string): string {
  return `${service.split(".").pop() ?? service}.${method}`;
}

/** "just now", "42 s ago", "5 min ago", "3 h ago", or the date. */
export function ago(date: Date | undefined, now = Date.now()): string {
  if (date === undefined) return "";
  const s = Math.round((now - date.getTime()) / 1000);
  if (s < 5) return "just now";
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86_400) return `${Math.floor(s / 3600)} h ago`;
  return date.toLocaleString();
}

/** Time left as "4:05", "1:02:03", or "expired". */
export function timeLeft(until: Date | undefined, now = Date.now()): string {
  if (until === undefined) return "no deadline";
  const total = Math.ceil((until.getTime() - now) / 1000);
  if (total <= 0) return "expired";
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  const mmss = `${String(m).padStart(h > 0 ? 2 : 1, "0")}:${String(s).padStart(2, "0")}`;
  return h > 0 ? `${h}:${mmss}` : mmss;
}

/** Lowercase hex of bytes. */
export function hex(bytes: Uint8Array): string {
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** A date and time in the reviewer's locale, with seconds. */
export function when(date: Date | undefined): string {
  return date === undefined ? "" : date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
}
