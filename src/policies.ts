// Auto-rollback policies: a snapshot may carry one, and the volume then
// rolls back to it by itself (a rollback job, src/rollback.ts, with trigger
// `policy:<policy>` by `snapshot <name>`):
//   on-start       when a server starts serving the volume read-write
//                  (src/serve.ts, before the control socket accepts requests);
//   on-disconnect  when its last client disconnects. While a snapshot carries
//                  it, the native admission hold is armed: a session that
//                  negotiates after the last disconnect waits until the
//                  rollback is visible (src/server.ts onLastDisconnect), so
//                  no client sees the volume in between.
// Invariants: at most one snapshot per volume carries a policy (refused with
// AUTO_ROLLBACK_CONFLICT otherwise); a failed snapshot cannot take one. The
// policy is a field of the snapshot's manifest record, so it is saved, and
// dropped with the snapshot, by the same atomic manifest writes as
// everything else: there is no crash order of its own. The hold follows the
// manifest: armHold() runs after every manifest save (src/volume.ts), and is
// never armed on a read-only volume, which cannot roll back.
import { NbdError } from './errors';
import type { RollbackResult } from './rollback';
import type { SnapshotInfo } from './snapshots';
import type { Volume } from './volume';
import { AUTO_ROLLBACK_POLICIES, type AutoRollbackPolicy, type SnapshotRecord } from './volume-meta';

export function parseAutoRollback(text: string): AutoRollbackPolicy | 'off' {
  if (text === 'off' || (AUTO_ROLLBACK_POLICIES as readonly string[]).includes(text)) return text as AutoRollbackPolicy | 'off';
  throw new NbdError('BAD_ARGUMENT', `unknown auto-rollback policy "${text}": use ${AUTO_ROLLBACK_POLICIES.join(', ')} or off`);
}

export class Policies {
  constructor(private readonly v: Volume) {}

  /** Arms the native admission hold while a snapshot carries the on-disconnect policy. */
  armHold(): void {
    try {
      this.v.native.setDisconnectHold(this.v.exportName, !this.v.readOnly && !!this.snapshotWith('on-disconnect'));
    } catch (err) {
      this.v.log.warn({ err: (err as Error).message }, 'cannot arm the on-disconnect hold');
    }
  }

  /** Refuses a policy on another snapshot than `exceptId` while one carries a policy. */
  refuseConflict(exceptId: number | undefined): void {
    const other = this.v.manifest.snapshots.find((x) => x.autoRollback && x.id !== exceptId);
    if (other) {
      throw new NbdError(
        'AUTO_ROLLBACK_CONFLICT',
        `snapshot "${other.name}" already carries auto-rollback=${other.autoRollback}; at most one snapshot per volume can: ` +
          `node-nbd-server snapshot set ${this.v.image} ${other.name} auto-rollback=off`,
      );
    }
  }

  set(name: string, policy: AutoRollbackPolicy | 'off'): Promise<SnapshotInfo> {
    const v = this.v;
    return v.serial(async () => {
      const s = v.snapshot(name);
      if (policy !== 'off') {
        this.refuseConflict(s.id);
        if (v.snapshots.info(name).state === 'failed') {
          throw new NbdError('SNAPSHOT_FAILED', `snapshot "${name}" failed and cannot carry an auto-rollback policy: ${s.failure?.reason ?? ''}`);
        }
      }
      const next: SnapshotRecord = { ...s };
      if (policy === 'off') delete next.autoRollback;
      else next.autoRollback = policy;
      v.save({ ...v.manifest, snapshots: v.manifest.snapshots.map((x) => (x.id === s.id ? next : x)) });
      v.log.info({ snapshot: name, autoRollback: policy }, 'auto-rollback policy set');
      return v.snapshots.describe(next);
    });
  }

  get(name: string): AutoRollbackPolicy | 'off' {
    return this.v.snapshot(name).autoRollback ?? 'off';
  }

  /** The snapshot carrying `policy`, if any. */
  snapshotWith(policy: AutoRollbackPolicy): string | undefined {
    return this.v.manifest.snapshots.find((x) => x.autoRollback === policy)?.name;
  }

  /** The volume's policy, if a snapshot carries one (`info IMAGE`). */
  current(): { snapshot: string; policy: AutoRollbackPolicy } | null {
    const s = this.v.manifest.snapshots.find((x) => x.autoRollback);
    return s?.autoRollback ? { snapshot: s.name, policy: s.autoRollback } : null;
  }

  /** Runs the volume's auto-rollback for `policy`, if a snapshot carries it. */
  async apply(policy: AutoRollbackPolicy): Promise<RollbackResult | undefined> {
    const name = this.snapshotWith(policy);
    if (!name) return undefined;
    return this.v.rollback.to(name, { trigger: `policy:${policy}`, by: `snapshot ${name}` });
  }
}
