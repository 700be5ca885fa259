#!/bin/bash
echo 'ran ok' > /app/output.txt
