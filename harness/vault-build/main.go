// Command vault is HashiCorp Vault's CLI and server, built from the Go module
// proxy as a plain dependency so the Airlock test harness has a real
// Vault-API dev server without a prebuilt download.
package main

import (
	"os"

	"github.com/hashicorp/vault/command"
)

func main() {
	os.Exit(command.Run(os.Args[1:]))
}
