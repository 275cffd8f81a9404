// Compile contracts/*.sol with the npm solc (solcjs, offline) into ABI + bytecode
// artifacts: node scripts/compile-contracts.js OUT_DIR
"use strict";
const fs = require("fs");
const path = require("path");
const solc = require("solc");

const root = path.resolve(__dirname, "..");
const outDir = path.resolve(process.argv[2] || path.join(root, "src/drip/chain/artifacts"));
const sources = {};
for (const file of fs.readdirSync(path.join(root, "contracts")).sort()) {
  if (file.endsWith(".sol")) {
    sources[file] = { content: fs.readFileSync(path.join(root, "contracts", file), "utf8") };
  }
}
const input = {
  language: "Solidity",
  sources,
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: "cancun",
    metadata: { bytecodeHash: "none" },
    outputSelection: { "*": { "*": ["abi", "evm.bytecode.object"] } },
  },
};
const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors || []).filter((e) => e.severity === "error");
for (const e of output.errors || []) console.error(e.formattedMessage);
if (errors.length) process.exit(1);
fs.mkdirSync(outDir, { recursive: true });
for (const [file, contracts] of Object.entries(output.contracts)) {
  for (const [name, c] of Object.entries(contracts)) {
    const artifact = { contractName: name, source: `contracts/${file}`, compiler: `solc ${solc.version()}`,
      abi: c.abi, bytecode: "0x" + c.evm.bytecode.object };
    fs.writeFileSync(path.join(outDir, `${name}.json`), JSON.stringify(artifact, null, 2) + "\n");
    console.log(`compiled ${name}`);
  }
}
