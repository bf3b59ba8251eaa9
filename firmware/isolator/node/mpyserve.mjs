// Serve MicroPython calls over stdin/stdout, one JSON-free text line each way.
//
// Usage: node mpyserve.mjs MODULE FUNCTION FILE.py...
// Copies each FILE.py into the interpreter's /lib, imports MODULE, then for
// every line on stdin calls MODULE.FUNCTION(line) and writes the returned
// string as one line on stdout.  A Python exception becomes the line
// "!error <type>: <message>" and the server goes on.  Whatever the Python
// code prints goes to stderr, so stdout carries only answers.  One process
// serves many calls: starting the interpreter is the slow part.
import { readFileSync } from "node:fs";
import { basename } from "node:path";
import { createInterface } from "node:readline";
import { loadMicroPython } from "@micropython/micropython-webassembly-pyscript";

// 16 MiB: a vector with a few frames of 4 KiB, their hex and JSON copies, with
// room for the garbage collector to keep up.
const HEAP_BYTES = 16 * 1024 * 1024;

const [moduleName, functionName, ...files] = process.argv.slice(2);
if (!moduleName || !functionName || files.length === 0) {
  process.stderr.write("usage: node mpyserve.mjs MODULE FUNCTION FILE.py...\n");
  process.exit(2);
}

const mp = await loadMicroPython({
  heapsize: HEAP_BYTES,
  stdout: (bytes) => process.stderr.write(Buffer.from(bytes)),
  stderr: (bytes) => process.stderr.write(Buffer.from(bytes)),
  linebuffer: false,
});
try {
  mp.FS.mkdir("/lib");
} catch {
  // already there in this build
}
for (const file of files) {
  mp.FS.writeFile("/lib/" + basename(file), readFileSync(file));
}
mp.runPython(`import sys\nif '/lib' not in sys.path:\n    sys.path.append('/lib')\nimport ${moduleName} as _served`);

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
  let answer;
  try {
    mp.globals.set("_line", line);
    mp.runPython(`_answer = _served.${functionName}(_line)\nimport gc\ngc.collect()`);
    answer = String(mp.globals.get("_answer"));
  } catch (error) {
    answer = "!error " + (error.type || error.name) + ": " + String(error.message).replace(/\n/g, " | ");
  }
  process.stdout.write(answer + "\n");
}
