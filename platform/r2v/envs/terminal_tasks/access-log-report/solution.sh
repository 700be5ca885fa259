#!/bin/bash
# Oracle: one command per line (each line is one env step, run in /app).
# `# r2v: may-fail` marks a diagnostic step expected to fail (the oracle does not retry it).
mkdir -p report
awk '{print $1}' access.log | sort -u > report/ips.txt
awk '{print $9}' access.log | sort | uniq -c | awk '{print $2, $1}' | sort -n > report/status.txt
awk '{print $7}' access.log | sort | uniq -c | sort -k1,1nr | head -1 | awk '{print $2}' > report/top_path.txt
echo "requests $(wc -l < access.log)" > report/summary.txt
cat report/status.txt
tar -czf report.tar.gz report
