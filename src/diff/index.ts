// Diff streams between snapshots: the Ceph `rbd diff v1` format written from
// a ChunkSource and applied to a DiffTarget (docs/diff-format.md).
export { RBD_DIFF_BANNER, MAX_SNAP_NAME, TAG, encodeHeader, encodeExtent, encodeEnd } from './rbd-diff-format';
export { writeRbdDiff, SEGMENT_BYTES, type WriteDiffOptions, type WriteDiffResult } from './rbd-diff-writer';
export { parseRbdDiff, DEFAULT_PIECE_BYTES, type DiffEvent, type DiffHeader, type ParseOptions } from './rbd-diff-parser';
export { applyRbdDiff, type ApplyDiffOptions, type ApplyDiffResult } from './rbd-diff-apply';
export { FileDiffTarget, NbdDiffTarget, type DiffTarget } from './diff-target';
