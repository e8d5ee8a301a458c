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
  return when(date);
}

/**
 * A duration in words, as precise as it matters: "1 h 5 min", "58 min", "4 min 5 s", "45 s".
 * Below ten minutes the seconds count; above, a minute is the unit (rounded down, so a
 * deadline is never overstated).
 */
export function durationWords(ms: number): string {
  const total = Math.max(0, Math.floor(ms / 1000));
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const seconds = total % 60;
  if (hours > 0) return minutes === 0 ? `${hours} h` : `${hours} h ${minutes} min`;
  if (total >= 600) return `${minutes} min`;
  if (minutes > 0) return seconds === 0 ? `${minutes} min` : `${minutes} min ${seconds} s`;
  return `${seconds} s`;
}

/** Lowercase hex of bytes. */
export function hex(bytes: Uint8Array): string {
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}

const withZone = new Intl.DateTimeFormat(undefined, { year: "numeric", month: "short", day: "numeric", hour: "numeric", minute: "2-digit", second: "2-digit", timeZoneName: "short" });
const timeWithZone = new Intl.DateTimeFormat(undefined, { hour: "numeric", minute: "2-digit", second: "2-digit", timeZoneName: "short" });

/** A date and time in the reviewer's locale and time zone, with seconds and the zone's name ("Mar 3, 2026, 2:05:09 PM UTC"). */
export function when(date: Date | undefined): string {
  return date === undefined ? "" : withZone.format(date);
}

/** A time of day with the zone ("2:05:09 PM UTC"), for instants within the day. */
export function clockTime(date: Date | undefined): string {
  return date === undefined ? "" : timeWithZone.format(date);
}
