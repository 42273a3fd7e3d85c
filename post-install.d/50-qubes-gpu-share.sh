#!/bin/sh
# Run in a template by qubes-core-agent after installs (post-install.d):
# tell dom0 this template supports the two gpu-share services, so that they
# are offered in the qube settings (qvm-features supported-service.*).
qvm-features-request supported-service.gpu-share=1
qvm-features-request supported-service.gpu-share-provider=1
