#!/bin/bash
total=0
for n in $(cat numbers.txt) do
  total=$((total + n))
done
echo "total: $total" > report.txt
