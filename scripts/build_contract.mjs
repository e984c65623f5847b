#!/usr/bin/env node
// Compile contracts/ConsensusMain.sol with the npm package `solc` (pinned in package.json) into the
// committed artifact jobs/consensus/ConsensusMain.json (ABI + creation and runtime bytecode).
//
//   node scripts/build_contract.mjs           write the artifact
//   node scripts/build_contract.mjs --check   exit 1 if the committed artifact differs from a fresh build
//
// The output is byte-for-byte reproducible: same solc version, same settings, same source.
import { createHash } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const require = createRequire(import.meta.url);
const solc = require("solc");

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const sourcePath = "contracts/ConsensusMain.sol";
const artifactPath = join(root, "jobs/consensus/ConsensusMain.json");
const contractName = "ConsensusMain";

// "paris" avoids PUSH0 and later opcodes so the bytecode runs on anvil, py-evm and older chains alike.
const settings = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: "paris",
  outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
};

function build() {
  const source = readFileSync(join(root, sourcePath), "utf8");
  const input = { language: "Solidity", sources: { [sourcePath]: { content: source } }, settings };
  const output = JSON.parse(solc.compile(JSON.stringify(input)));
  const errors = (output.errors || []).filter((e) => e.severity === "error");
  if (errors.length) {
    for (const e of errors) console.error(e.formattedMessage);
    process.exit(1);
  }
  const contract = output.contracts[sourcePath][contractName];
  const artifact = {
    contractName,
    source: sourcePath,
    sourceSha256: createHash("sha256").update(source).digest("hex"),
    compiler: { name: "solc", version: solc.version(), settings: { optimizer: settings.optimizer, evmVersion: settings.evmVersion } },
    abi: contract.abi,
    bytecode: "0x" + contract.evm.bytecode.object,
    deployedBytecode: "0x" + contract.evm.deployedBytecode.object,
  };
  return JSON.stringify(artifact, null, 2) + "\n";
}

const text = build();
if (process.argv.includes("--check")) {
  let current = "";
  try {
    current = readFileSync(artifactPath, "utf8");
  } catch {
    current = "";
  }
  if (current !== text) {
    console.error(`${artifactPath} is out of date: run node scripts/build_contract.mjs`);
    process.exit(1);
  }
  console.log("artifact is up to date");
} else {
  writeFileSync(artifactPath, text);
  console.log(`wrote ${artifactPath}`);
}
