import t from 'tap';
import { parseSize, formatSize } from '../src/size';

t.test('parseSize accepts binary units', async (t) => {
  t.equal(parseSize('512'), 512);
  t.equal(parseSize('4k'), 4096);
  t.equal(parseSize('512M'), 512 * 2 ** 20);
  t.equal(parseSize('1G'), 2 ** 30);
  t.equal(parseSize('1GiB'), 2 ** 30);
  t.equal(parseSize('1T'), 2 ** 40);
  t.equal(parseSize('1.5G'), 1.5 * 2 ** 30);
});

t.test('parseSize rejects nonsense with BAD_SIZE', async (t) => {
  for (const bad of ['', 'abc', '-1G', '0', '1.3', '1X', '1e3', '99999999999T']) {
    t.throws(() => parseSize(bad), { name: 'NbdError', code: 'BAD_SIZE' }, bad);
  }
});

t.test('formatSize', async (t) => {
  t.equal(formatSize(1024), '1 KiB');
  t.equal(formatSize(1536), '1.5 KiB');
  t.equal(formatSize(2 ** 30), '1 GiB');
});
