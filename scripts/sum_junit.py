"""Adds up pytest junit XML files into one closing line; exit 1 on any failure."""
import sys
import xml.etree.ElementTree as ET

totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
for path in sys.argv[1:]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        print(f"missing or unreadable test report {path}: counting it as a failure")
        totals["errors"] += 1
        continue
    for suite in root.iter("testsuite"):
        for k in totals:
            totals[k] += int(suite.get(k, 0))
failed = totals["failures"] + totals["errors"]
passed = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
print(f"total: {passed} passed, {failed} failed, {totals['skipped']} skipped")
sys.exit(1 if failed or passed == 0 else 0)
