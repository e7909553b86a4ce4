// Validate glTF/GLB files with the Khronos glTF validator; prints one JSON report line per file:
// the counts of errors, warnings, infos and hints, and the first messages of each severity.
// Usage: node validate_gltf.js FILE...   (exit status 1 if any file has errors)
const fs = require('fs');
const validator = require('gltf-validator');

async function main(files) {
  let failed = false;
  for (const file of files) {
    const report = await validator.validateBytes(new Uint8Array(fs.readFileSync(file)));
    const issues = report.issues;
    // Severities: 0 error, 1 warning, 2 info, 3 hint.
    console.log(JSON.stringify({file, errors: issues.numErrors, warnings: issues.numWarnings,
      infos: issues.numInfos, hints: issues.numHints, messages: issues.messages.slice(0, 10)}));
    if (issues.numErrors > 0) failed = true;
  }
  process.exit(failed ? 1 : 0);
}
main(process.argv.slice(2)).catch(e => { console.error(e); process.exit(2); });
