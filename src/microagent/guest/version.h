/* The agent's version, reported by --version, HELLO and info. */
#ifndef MICROAGENT_VERSION_H
#define MICROAGENT_VERSION_H

#define AGENT_VERSION "0.2.0"

#endif
