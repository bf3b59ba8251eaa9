// A virtual isolator board: MicroPython (WebAssembly port) behind a TCP socket
// that speaks like the Pico's USB console, so the real mpremote can flash it
// and read its status (connect socket://127.0.0.1:PORT).
//
// Usage: node virtualboard.mjs FILE.py...
// Copies each FILE.py (the virtual `machine` and `_thread` modules and what
// they need) into the interpreter's /lib, listens on an ephemeral port on
// 127.0.0.1, prints "listening PORT" and serves one connection at a time.
// machine.reset() reboots: forget the app and virtual hardware modules, run main.py from
// the (in-memory) filesystem, start a fresh REPL.  Exits when stdin closes.
//
// Not modelled: USB timing, real hardware, threads (see virtual/_thread.py),
// a persistent filesystem (files live as long as this process), and raw-paste
// mode: the port's event-driven REPL lacks it, so the bridge answers the
// raw-paste request with "not supported", as such a board would.  The port
// reports Emscripten's errno numbers; the bridge rewrites the few a file copy
// meets to the numbers a Pico prints, which is what mpremote understands.
import { readFileSync } from "node:fs";
import { createServer } from "node:net";
import { basename } from "node:path";
import { loadMicroPython } from "@micropython/micropython-webassembly-pyscript";

const HEAP_BYTES = 16 * 1024 * 1024;
const RAW_PASTE_REQUEST = Buffer.from([0x05, 0x41, 0x01]); // Ctrl-E 'A' Ctrl-A
const APP_MODULES = ["isolator_app", "filtercore", "pump", "main", "machine", "_thread", "fakeboard"];
// Emscripten errno -> MicroPython (newlib) errno: ENOENT, EEXIST, EISDIR, ENOTDIR.
const ERRNO = { 44: 2, 20: 17, 31: 21, 54: 20 };

const files = process.argv.slice(2);
let client = null;
let resetRequested = false;
let pending = [];
let output = [];

const mp = await loadMicroPython({
  heapsize: HEAP_BYTES,
  stdout: (bytes) => {
    output.push(Buffer.from(bytes));
  },
  linebuffer: false,
});
globalThis.virtualBoardReset = () => {
  resetRequested = true;
};
try {
  mp.FS.mkdir("/lib");
} catch {
  // already there
}
for (const file of files) {
  mp.FS.writeFile("/lib/" + basename(file), readFileSync(file));
}
mp.FS.mkdir("/flash");
mp.runPython("import os, sys\nos.chdir('/flash')\nsys.path.insert(0, '/flash')\nif '/lib' not in sys.path:\n    sys.path.append('/lib')");
mp.replInit();

function boot() {
  resetRequested = false;
  const forget = APP_MODULES.map((m) => `sys.modules.pop('${m}', None)`).join("\n");
  try {
    mp.runPython(`import sys, os\n${forget}\nif 'main.py' in os.listdir():\n    exec(open('main.py').read(), {'__name__': '__main__'})`);
  } catch (error) {
    output.push(Buffer.from(String(error.message) + "\r\n"));
  }
  mp.replInit();
}

function flush() {
  if (!output.length) return;
  let text = Buffer.concat(output).toString("latin1");
  output = [];
  text = text.replace(/OSError: (\[Errno )?(\d+)/g, (all, prefix, n) =>
    n in ERRNO ? "OSError: " + (prefix || "") + ERRNO[n] : all,
  );
  if (client) client.write(Buffer.from(text, "latin1"));
}

function feed(data) {
  feedChars(data);
  flush();
}

function feedChars(data) {
  pending.push(...data);
  while (pending.length) {
    if (pending[0] === RAW_PASTE_REQUEST[0]) {
      if (pending.length < 3) return; // wait for the rest of a possible request
      if (pending[1] === RAW_PASTE_REQUEST[1] && pending[2] === RAW_PASTE_REQUEST[2]) {
        pending = pending.slice(3);
        output.push(Buffer.from("R\x00"));
        continue;
      }
    }
    const c = pending.shift();
    mp.replProcessChar(c);
    if (resetRequested) {
      pending = [];
      boot();
    }
  }
}

const server = createServer((socket) => {
  if (client) {
    socket.destroy();
    return;
  }
  client = socket;
  socket.on("data", feed);
  socket.on("close", () => {
    client = null;
    pending = [];
  });
  socket.on("error", () => {});
});
server.listen(0, "127.0.0.1", () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});
process.stdin.on("data", () => {});
process.stdin.on("end", () => {
  server.close();
  if (client) client.destroy();
  process.exit(0);
});
