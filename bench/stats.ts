// Percentiles and medians for the measurements.

/** Nearest-rank percentile (p in 0..100) of the first `count` values. */
export function percentile(values: Float64Array | number[], p: number, count = values.length): number {
  if (count === 0) return Number.NaN;
  const sorted = Float64Array.from(values.slice(0, count)).sort();
  const rank = Math.min(count - 1, Math.max(0, Math.ceil((p / 100) * count) - 1));
  return sorted[rank] ?? Number.NaN;
}

export function median(values: number[]): number {
  const finite = values.filter((v) => Number.isFinite(v)).sort((a, b) => a - b);
  if (finite.length === 0) return Number.NaN;
  const middle = Math.floor(finite.length / 2);
  return finite.length % 2 === 1 ? (finite[middle] as number) : ((finite[middle - 1] as number) + (finite[middle] as number)) / 2;
}
